"""The metrics log (simdino_jax/train/metrics.py): metrics.jsonl and its resume truncation, TensorBoard event files
(read back through the TFRecord framing and tensorboardX's protobufs), W&B through a fake module, the progress line
with a fake clock, and the curves. No training."""

import json
import logging
import os
import re
import struct
import sys
import types

import ml_collections
import pytest

from simdino_jax.train import metrics as metrics_lib
from simdino_jax.train.metrics import MetricsLog


class FakeClock:
  def __init__(self, t=1000.0):
    self.t = t

  def __call__(self):
    return self.t


def make_log(workdir, lines=None, **kwargs):
  kwargs.setdefault("total_steps", 100)
  kwargs.setdefault("batch_size", 8)
  kwargs.setdefault("tensorboard", False)
  kwargs.setdefault("wandb", {})
  kwargs.setdefault("clock", FakeClock())
  kwargs.setdefault("printer", (lines if lines is not None else []).append)
  return MetricsLog(str(workdir), **kwargs)


def read_jsonl(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


# -- metrics.jsonl -----------------------------------------------------------------------------------------------------
def test_records_carry_values_and_rates(tmp_path):
  clock = FakeClock()
  with make_log(tmp_path, clock=clock) as log:
    for step in (10, 20, 30):
      clock.t += 5.0
      log.write(step, {"loss": 1.0 / step, "lr": 1e-3, "momentum": 0.99, "data/skipped": 0})
  records = read_jsonl(tmp_path)
  assert [r["step"] for r in records] == [10, 20, 30]
  assert records[1]["loss"] == pytest.approx(1 / 20) and records[1]["data/skipped"] == 0
  assert [r["steps_per_sec"] for r in records] == pytest.approx([2.0, 2.0, 2.0])  # 10 steps in 5 s
  assert [r["images_per_sec"] for r in records] == pytest.approx([16.0, 16.0, 16.0])
  assert list(records[0])[:2] == ["step", "loss"] and list(records[0])[-2:] == ["steps_per_sec", "images_per_sec"]


def test_resume_drops_later_records_and_cut_lines_and_exposes_the_last_kept(tmp_path):
  lines = [json.dumps({"step": s, "loss": float(s), "data/skipped": s // 10}) for s in (10, 20, 30, 40)]
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:2]) + '\n{"step": 25, "lo\n' + "\n".join(lines[2:]))
  with make_log(tmp_path, start_step=30) as log:
    assert log.last_record == {"step": 30, "loss": 30.0, "data/skipped": 3}
    assert [r["step"] for r in read_jsonl(tmp_path)] == [10, 20, 30]  # rewritten before the first write
    log.write(40, {"loss": 0.5})
  assert [r["step"] for r in read_jsonl(tmp_path)] == [10, 20, 30, 40]
  # A run from step 0 starts metrics.jsonl again.
  with make_log(tmp_path, start_step=0) as log:
    assert log.last_record is None
  assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_no_file_means_no_last_record(tmp_path):
  with make_log(tmp_path / "new", start_step=5) as log:
    assert log.last_record is None
    log.write(6, {"loss": 1.0})
  assert [r["step"] for r in read_jsonl(tmp_path / "new")] == [6]


@pytest.mark.parametrize("append", [True, False])
def test_jsonl_writer_appends_or_rewrites_whole(tmp_path, append):
  from etils import epath

  path = epath.Path(tmp_path) / "metrics.jsonl"
  writer = metrics_lib.JsonLinesWriter(path, ['{"step": 1}\n'], append=append)
  assert (writer.file is None) == (not append)
  for step in (2, 3):
    writer.write(json.dumps({"step": step}) + "\n")
    writer.flush()
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == list(range(1, step + 1))
  writer.close()
  assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_other_processes_write_nothing(tmp_path, capsys):
  log = MetricsLog(
    str(tmp_path / "w"),
    total_steps=10,
    start_step=0,
    batch_size=4,
    is_main=False,
    config=ml_collections.ConfigDict(dict(tensorboard=True, wandb=dict(project="p"))),
  )
  with log:
    record = log.write(5, {"loss": 1.0})
    log.log("hello")
    assert log.draw_curves() is None
  assert record["step"] == 5 and record["loss"] == 1.0
  assert not (tmp_path / "w").exists()
  assert capsys.readouterr().out == ""


# -- TensorBoard -------------------------------------------------------------------------------------------------------
def read_records(path):
  """The records of a TFRecord file: uint64 length, uint32 masked crc of it, data, uint32 masked crc of the data."""
  from tensorboardX.record_writer import masked_crc32c

  out = []
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    header = data[pos : pos + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
    assert header_crc == masked_crc32c(header)
    body = data[pos + 12 : pos + 12 + length]
    (body_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
    assert body_crc == masked_crc32c(body)
    out.append(body)
    pos += 16 + length
  return out


def read_events(logdir):
  """[(file, Event)] of the event files under ``logdir``, files in TensorBoard's (name) order."""
  from tensorboardX.proto.event_pb2 import Event

  events = []
  for name in sorted(os.listdir(logdir)):
    assert name.startswith("events.out.tfevents."), name
    for body in read_records(os.path.join(logdir, name)):
      event = Event()
      event.ParseFromString(body)
      events.append((name, event))
  return events


def scalars_as_tensorboard_shows(events):
  """{tag: {step: value}}, applying the purge markers as TensorBoard does: a SessionLog START at step s hides the
  events read before it with step >= s."""
  from tensorboardX.proto.event_pb2 import SessionLog

  series = {}
  for _, event in events:
    if event.HasField("session_log") and event.session_log.status == SessionLog.START:
      for points in series.values():
        for step in [s for s in points if s >= event.step]:
          del points[step]
    if event.HasField("summary"):
      for value in event.summary.value:
        series.setdefault(value.tag, {})[event.step] = value.simple_value
  return series


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
  clock = FakeClock()
  with make_log(tmp_path, tensorboard=True, clock=clock) as log:
    for step in (1, 2, 3):
      clock.t += 1.0
      log.write(step, {"loss": 10.0 - step, "data/skipped": step})
    files = os.listdir(tmp_path / "tensorboard")
    assert len(files) == 1  # flushed at each write: readable while the run goes on
    assert {e.step for _, e in read_events(tmp_path / "tensorboard") if e.HasField("summary")} == {1, 2, 3}
  series = scalars_as_tensorboard_shows(read_events(tmp_path / "tensorboard"))
  assert set(series) == {"loss", "data/skipped", "steps_per_sec", "images_per_sec"}
  assert series["loss"] == {1: 9.0, 2: 8.0, 3: 7.0}
  assert series["data/skipped"] == {1: 1.0, 2: 2.0, 3: 3.0}
  assert series["images_per_sec"] == pytest.approx({1: 8.0, 2: 8.0, 3: 8.0})


def test_tensorboard_resume_purges_the_interrupted_runs_later_steps(tmp_path):
  with make_log(tmp_path, tensorboard=True) as log:
    for step in (1, 2, 3, 4):
      log.write(step, {"loss": float(step)})
  # Interrupted after step 4, resumed from the checkpoint of step 2: steps 3, 4 are logged again.
  with make_log(tmp_path, tensorboard=True, start_step=2) as log:
    for step in (3, 4, 5):
      log.write(step, {"loss": 100.0 + step})
  events = read_events(tmp_path / "tensorboard")
  assert len({name for name, _ in events}) == 2
  second = [e for name, e in events if name == events[-1][0]]
  assert any(e.HasField("session_log") and e.step == 3 for e in second)  # the purge marker: steps >= 3 of earlier files
  assert scalars_as_tensorboard_shows(events)["loss"] == {1: 1.0, 2: 2.0, 3: 103.0, 4: 104.0, 5: 105.0}


def test_tensorboard_off(tmp_path):
  with make_log(tmp_path, config=ml_collections.ConfigDict(dict(tensorboard=False)), tensorboard=None) as log:
    log.write(1, {"loss": 1.0})
  assert not (tmp_path / "tensorboard").exists()


# -- Weights & Biases --------------------------------------------------------------------------------------------------
class FakeWandb(types.ModuleType):
  def __init__(self):
    super().__init__("wandb")
    self.inits, self.logged, self.finished = [], [], 0
    self.run = None

  def init(self, **kwargs):
    self.inits.append(kwargs)
    fake = self

    class Run:
      def log(self, values, step=None):
        fake.logged.append((step, dict(values)))

      def finish(self):
        fake.finished += 1

    return Run()


def wandb_config(**wandb):
  c = ml_collections.ConfigDict(dict(seed=3, model=dict(variant="S/16"), tensorboard=False, mesh=(("data", -1),)))
  c.wandb = ml_collections.ConfigDict(dict(project="", entity="", name="", mode="online", tags=()))
  c.wandb.update(wandb)
  return c


def test_wandb_run_gets_config_values_and_a_stable_id(tmp_path, monkeypatch):
  fake = FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  config = wandb_config(project="simdino", name="run1", mode="offline", tags=("a", "b"))
  with make_log(tmp_path, config=config, wandb=None, tensorboard=None) as log:
    log.write(1, {"loss": 2.0, "data/skipped": 0})
    log.write(2, {"loss": 1.5, "data/skipped": 0})
  assert fake.finished == 1
  (init,) = fake.inits
  run_id = (tmp_path / "wandb_id.txt").read_text().strip()
  assert init == dict(
    project="simdino",
    entity=None,
    name="run1",
    mode="offline",
    tags=["a", "b"],
    config=init["config"],
    dir=str(tmp_path),
    resume="allow",
    id=run_id,
  )
  assert init["config"]["seed"] == 3 and init["config"]["model"] == {"variant": "S/16"}
  json.dumps(init["config"])  # plain JSON values
  assert [step for step, _ in fake.logged] == [1, 2]
  assert fake.logged[1][1]["loss"] == 1.5 and "step" not in fake.logged[1][1]
  assert set(fake.logged[1][1]) == {"loss", "data/skipped", "steps_per_sec", "images_per_sec"}
  # Resumed: the same W&B run continues; a run from step 0 is a new one.
  with make_log(tmp_path, config=config, wandb=None, start_step=2) as log:
    log.write(3, {"loss": 1.0})
  assert fake.inits[1]["id"] == run_id and fake.logged[-1][0] == 3
  with make_log(tmp_path, config=config, wandb=None, start_step=0):
    pass
  assert fake.inits[2]["id"] != run_id
  assert (tmp_path / "wandb_id.txt").read_text().strip() == fake.inits[2]["id"]


def test_wandb_off_without_project(tmp_path, monkeypatch):
  fake = FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  with make_log(tmp_path, config=wandb_config(), wandb=None) as log:
    log.write(1, {"loss": 1.0})
  assert fake.inits == [] and not (tmp_path / "wandb_id.txt").exists()


def test_wandb_missing_package_warns_once_and_training_goes_on(tmp_path, monkeypatch, caplog):
  monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
  with caplog.at_level(logging.WARNING, logger=metrics_lib.__name__):
    with make_log(tmp_path, config=wandb_config(project="simdino"), wandb=None) as log:
      log.write(1, {"loss": 1.0})
      log.write(2, {"loss": 0.5})
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "wandb package is not installed" in warnings[0], warnings
  assert [r["step"] for r in read_jsonl(tmp_path)] == [1, 2]


def test_wandb_init_failure_is_a_warning(tmp_path, monkeypatch, caplog):
  fake = FakeWandb()

  def fail(**kwargs):
    raise RuntimeError("no network")

  fake.init = fail
  monkeypatch.setitem(sys.modules, "wandb", fake)
  with caplog.at_level(logging.WARNING, logger=metrics_lib.__name__):
    with make_log(tmp_path, wandb={"project": "p"}) as log:
      log.write(1, {"loss": 1.0})
  assert "no network" in caplog.text


# -- the progress line -------------------------------------------------------------------------------------------------
def test_progress_line_excludes_compilation_from_rate_and_eta(tmp_path):
  clock, lines = FakeClock(), []
  keys = ("loss", "align")  # what the trainer passes: the method's progress_line_keys
  with make_log(tmp_path, lines, clock=clock, total_steps=100, start_step=20, batch_size=8, progress_keys=keys) as log:
    clock.t += 90.0  # compilation + 10 steps
    log.write(30, {"loss": 1.23456, "align": 0.5, "lr": 1e-3, "momentum": 0.996, "other": 7.0})
    clock.t += 5.0  # 10 steps in 5 s
    log.write(40, {"loss": 1.0, "lr": 1e-3, "momentum": 0.996, "data/skipped": 2})
    clock.t += 10.0  # 10 steps in 10 s: 20 steps in 15 s since the first log
    log.write(50, {"loss": 0.9})
  first, second, third = lines
  assert first.startswith("step 30/100 (30%) | loss 1.235 align 0.5 | lr 0.001 m 0.9960 | elapsed 0:01:30")
  assert not re.search(r"ETA \d", first) and "steps/s" not in first and "other" not in first
  assert "compilation" in first
  assert second == (
    "step 40/100 (40%) | loss 1 | skipped 2 undecodable images | lr 0.001 m 0.9960 | "
    "2.00 steps/s 16 img/s | elapsed 0:01:35 | ETA 0:00:30"
  )
  assert third == "step 50/100 (50%) | loss 0.9 | 1.00 steps/s 8 img/s | elapsed 0:01:45 | ETA 0:00:37"


def test_progress_line_printed_to_stdout_by_default(tmp_path, capsys):
  with MetricsLog(
    str(tmp_path), total_steps=4, start_step=0, batch_size=2, tensorboard=False, clock=FakeClock()
  ) as log:
    log.write(4, {"loss": 1.0})
    log.log("done")
  out = capsys.readouterr().out.splitlines()
  assert out[0] == "step 4/4 (100%) | loss 1 | elapsed 0:00:00 (compilation included)"
  assert out[1] == "done"


# -- curves ------------------------------------------------------------------------------------------------------------
def test_draw_curves_writes_a_png(tmp_path):
  lines = []
  with make_log(tmp_path, lines) as log:
    for step in (1, 2, 3):
      log.write(step, {"loss": 1.0 / step, "lr": 1e-3})
    panels = log.draw_curves()
  assert "loss" in panels and "lr" in panels
  assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "curves.png" in lines[-1]


def test_draw_curves_failure_is_a_warning(tmp_path, monkeypatch, caplog):
  from simdino_jax import plot

  def broken(*args, **kwargs):
    raise RuntimeError("no matplotlib here")

  monkeypatch.setattr(plot, "plot_curves", broken)
  with caplog.at_level(logging.WARNING, logger=metrics_lib.__name__):
    with make_log(tmp_path) as log:
      log.write(1, {"loss": 1.0})
    assert log.draw_curves() is None
  assert "could not draw the training curves" in caplog.text and "no matplotlib here" in caplog.text
  assert not (tmp_path / "curves.png").exists()
