"""Exact resume after SIGTERM with issue 32's additions on: gradient accumulation (exact mode), and Gram anchoring
together with distillation (one config: the setup builds both and both terms act; the first Gram teacher loaded from
a file, config.gram.teacher, that is moved away before the resume: restored, never reloaded; fed its own 24 px crops,
config.gram.crop_size); the accumulation's refusal of gram / distill names the fields; a checkpoint of a gram-on
(distill-on) run restored with it off names config.gram.enabled (config.distill.enabled) first.

Each interrupted run gets a real SIGTERM, sent to this process during step ``STOP`` while the trainer's handler is
installed (trainer._StopRequest): the trainer saves a checkpoint at that step boundary and returns, as the CLI then
exits 75. The same config is run again on the same workdir (it must resume from that checkpoint: counted steps) and
its final state is compared leaf by leaf, bitwise, with an uninterrupted run's: student, EMA teacher, optimizer and
loss state, rng, gram_teacher and distill_teacher.

In-process, not a CLI subprocess per run: the process-level part (the exit code 75, the re-run of the same command,
the data stream's position) is one code path for every config, tested with real subprocesses in
tests/test_checkpointing.py (SIGTERM and SIGINT, bitwise end state) and tests/test_multihost_signals.py. What the
additions change is the TrainState's leaves and the step, which the in-process trainer runs exercise whole (restore
target, checkpoint, distill_teacher.json, the step) without importing jax three times per config.
"""

import json
import os
import signal
import time

import jax
import numpy as np
import pytest
from conftest import make_tiny_config
from test_distill import network, teacher_of

from simdino_jax import config as config_lib
from simdino_jax.errors import CheckpointMismatchError, ConfigError
from simdino_jax.io import checkpointing, formats
from simdino_jax.train import trainer
from simdino_jax.tree import named_leaves

TOTAL, STOP = 5, 3  # steps of a run; the SIGTERM arrives during step STOP (1-based), checkpoint STOP is the only one
# Gram teacher: loaded before iteration 1 (0-based; term off at iteration 0), refreshed after iterations 1 and 3, i.e.
# taken as iterations 2 and 4 start: the resumed run's first iteration (3) uses the RESTORED snapshot, its second
# refreshes it.
GRAM = dict(enabled=True, weight=0.5, start_step=1, first_refresh=2, refresh_every=2, max_refreshes=0)


def base():
  c = make_tiny_config()
  c.method = "simdinov2"  # masks, the coding rate and patch tokens: every path these features touch
  c.model.depth, c.head.num_layers = 1, 1  # drop path stays on (0.1): its keys must be the same after a resume
  c.total_steps, c.checkpoint_every, c.tensorboard = TOTAL, 0, False
  c.evals.knn.update(every=0, final=False, at_init=False)
  return c


def accumulation_config():
  c = base()
  c.accumulation_steps, c.accumulation_mode = 2, "exact"
  return c


def gram_distill_config(source):
  c = base()
  c.gram.update(GRAM)
  c.distill.update(enabled=True, teacher=str(source))
  c.gram.teacher = str(source / "gram_backbone.npz")  # (gram_source): moved away with the source before the resume
  c.gram.crop_size = 24  # the Gram teacher's own larger crops from the data pipeline (16 px global crops)
  return c


def teacher_source(path, config):
  """A workdir of ours holding a wider network's EMA teacher (what distill reads): {name: array}."""
  tcfg = teacher_of(config)
  variables = network(tcfg, 7)[1]
  with checkpointing.Checkpointer(path / "checkpoints") as ckpt:
    ckpt.save(5, {"step": np.int32(5), "teacher": variables}, checkpointing.config_dict(tcfg))
  return {k: np.asarray(v) for k, v in named_leaves(variables).items()}


def gram_source(path, config):
  """An export of ours (as simdino_jax.export writes it) of a backbone of the student's architecture: the first Gram
  teacher (config.gram.teacher)."""
  backbone = {f"backbone/{k}": np.asarray(v) for k, v in named_leaves(network(config, 11)[1]["backbone"]).items()}
  formats.save_npz(backbone, str(path), {"layout": "flax", "config": json.dumps(checkpointing.config_dict(config))})


def run(config, workdir, monkeypatch, stop_at=None):
  """(trainer, run()'s result, steps this run trained); with ``stop_at``, a SIGTERM to this process during that step
  of this run, the step returning only once the trainer's watcher has seen it (so the stop is at that boundary)."""
  requests = []

  class Recording(trainer._StopRequest):
    def __enter__(self):
      requests.append(self)
      return super().__enter__()

  monkeypatch.setattr(trainer, "_StopRequest", Recording)
  monkeypatch.setattr(trainer.MetricsLog, "draw_curves", lambda self: None)  # matplotlib: ~1 s a run, no state
  tr = trainer.Trainer(config, str(workdir))
  step, steps = tr.compiled_step(), []

  def counted(state, batch):
    out = step(state, batch)
    steps.append(1)
    if len(steps) == stop_at:
      # Never a SIGTERM this process would die of: the trainer's handler must be the one installed.
      assert signal.getsignal(signal.SIGTERM) is Recording._handle, signal.getsignal(signal.SIGTERM)
      os.kill(os.getpid(), signal.SIGTERM)
      deadline = time.monotonic() + 60
      while requests[-1].signal_name is None and time.monotonic() < deadline:
        time.sleep(0.001)
    return out

  monkeypatch.setattr(tr, "compiled_step", lambda **_: counted)
  result = tr.run()
  monkeypatch.undo()
  return tr, result, len(steps)


def leaves(tr):
  return {
    jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(jax.device_get(tr.state))
  }


def records(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def stopped_then_resumed_equals_uninterrupted(config, tmp_path, monkeypatch, before_resume=lambda: None):
  """Runs ``config`` uninterrupted and stopped + resumed; asserts the same end state bitwise; the uninterrupted
  trainer."""
  whole, result, trained = run(config, tmp_path / "whole", monkeypatch)
  assert result == {"step": TOTAL} and trained == TOTAL
  _, result, trained = run(config, tmp_path / "run", monkeypatch, stop_at=STOP)
  assert result["stopped"] == "SIGTERM" and result["step"] == STOP and trained == STOP, result
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == [str(STOP)]
  before_resume()
  resumed, result, trained = run(config, tmp_path / "run", monkeypatch)
  assert result == {"step": TOTAL} and trained == TOTAL - STOP  # resumed from checkpoint STOP, not from scratch
  want, got = leaves(whole), leaves(resumed)
  assert got.keys() == want.keys()
  for name, value in want.items():
    assert got[name].dtype == value.dtype, name
    np.testing.assert_array_equal(got[name], value, err_msg=name)
  assert [(r["step"], r["loss"]) for r in records(tmp_path / "run")] == [
    (r["step"], r["loss"]) for r in records(tmp_path / "whole")
  ]
  return whole, want


def test_sigterm_resume_with_exact_accumulation_is_exact(tmp_path, monkeypatch):
  stopped_then_resumed_equals_uninterrupted(accumulation_config(), tmp_path, monkeypatch)


def test_sigterm_resume_with_gram_and_distillation_is_exact_and_both_act(tmp_path, monkeypatch):
  source = tmp_path / "teacher_run"
  frozen = teacher_source(source, base())
  gram_source(source / "gram_backbone.npz", base())
  config = gram_distill_config(source)
  # The resumed run reads the frozen teacher from its own checkpoint (and its config from DIR/distill_teacher.json).
  whole, state = stopped_then_resumed_equals_uninterrupted(
    config, tmp_path, monkeypatch, before_resume=lambda: os.rename(source, tmp_path / "moved")
  )
  assert whole.setup.gram is not None and whole.setup.distill_graphdef is not None  # the setup built both
  distill = named_leaves(jax.device_get(whole.state.distill_teacher))
  assert distill.keys() == frozen.keys()
  for name, value in frozen.items():  # loaded whole from the source, never updated
    np.testing.assert_array_equal(np.asarray(distill[name]), value, err_msg=name)
  gram = [k for k in state if "gram_teacher" in k]
  assert gram and not all(np.array_equal(state[k], 0 * state[k]) for k in gram)
  logged = records(tmp_path / "whole")
  # The loaded Gram teacher initialises the term from iteration 0 (the EMA teacher's load before iteration 1 and the
  # refreshes follow), as DINOv3 with gram.ckpt.
  assert [r["gram_weight"] for r in logged] == [GRAM["weight"]] * TOTAL
  # Finite; the Gram term nonzero: the loaded teacher, then snapshots lagging the student.
  assert all(np.isfinite(r["loss"]) for r in logged) and all(r["gram_loss"] > 0 for r in logged[:1] + logged[2:])
  # Resuming the run with gram (or distill) off: refused naming that field first and alone (the state's shape
  # differs), even beside a field sorted before it that does not shape the state.
  for block in ("gram", "distill"):
    other = gram_distill_config(source)  # (moved away: a resume reads DIR/distill_teacher.json)
    other[block].enabled, other.checkpoint_every = False, 7
    with pytest.raises(CheckpointMismatchError) as err:
      trainer.Trainer(other, str(tmp_path / "run")).run()
    assert f"(config.{block}.enabled: checkpoint True, this run False)" in str(err.value), str(err.value)


@pytest.mark.parametrize("block", ["gram", "distill"])
def test_accumulation_refuses_gram_and_distillation_naming_both_fields(block):
  config = base()
  config[block].enabled = True
  if block == "distill":
    config.distill.teacher = "/any/teacher"  # not read by validate
  config_lib.validate(config, num_devices=1)  # valid without accumulation
  config.accumulation_steps = 2
  with pytest.raises(ConfigError) as err:
    config_lib.validate(config, num_devices=1)
  message = str(err.value)
  assert message.startswith("config.accumulation_steps: ") and f"config.{block}.enabled" in message, message
  assert "\n" not in message
