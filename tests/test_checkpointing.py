"""Checkpoints: exact round trip, resume == uninterrupted (after a SIGKILL), fall-back past corrupt checkpoints,
SIGTERM, and restoring onto another device count.

The CLI runs share a persistent XLA compilation cache (same command, same device count: compiled once), which
keeps each process at a few seconds on 2 CPU cores.
"""

import glob
import json
import logging
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pod
import pytest

from simdino_jax.io import checkpointing
from simdino_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_DEVICES = 8  # devices of the CLI runs that write checkpoints; this (pytest) process has 1

# configs/demo.py scaled down (as in test_trainer.py) to 6 steps with a checkpoint every 2.
OVERRIDES = {
  "total_steps": 6,
  "checkpoint_every": 2,
  "warmup_steps": 1,
  "log_every": 1,
  "batch_size": 8,
  "model.depth": 1,
  "model.embed_dim": 24,
  "head.hidden_dim": 32,
  "data.num_local": 1,
  "data.global_size": 16,
  "data.local_size": 8,
}


def cli_config():
  """The config the CLI builds from configs/demo.py and OVERRIDES."""
  config = runpy.run_path(os.path.join(ROOT, "configs", "demo.py"))["get_config"]()
  config.update_from_flattened_dict(OVERRIDES)
  return config


def cli(workdir):
  return [
    sys.executable,
    "-m",
    "simdino_jax.train",
    "--config=configs/demo.py",
    f"--workdir={workdir}",
    *(f"--config.{k}={v}" for k, v in OVERRIDES.items()),
  ]


@pytest.fixture(scope="module")
def env():
  # The session's compilation cache (tests/conftest.py) comes with os.environ: the CLI runs compile once.
  return pod.env(NUM_DEVICES)


@pytest.fixture(scope="module")
def run_a(env, tmp_path_factory):
  """Workdir of an uninterrupted 6-step CLI run on NUM_DEVICES devices."""
  workdir = tmp_path_factory.mktemp("run_a")
  out = subprocess.run(cli(workdir), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed" not in out.stdout
  return workdir


@pytest.fixture(scope="module")
def target():
  """The abstract TrainState of cli_config() with this process's (1-device) shardings."""
  return trainer.Trainer(cli_config(), "/nonexistent").abstract_state()


def leaves(tree):
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def assert_trees_equal(a, b):
  a, b = leaves(a), leaves(b)
  assert a.keys() == b.keys()
  for key in a:
    assert a[key].dtype == b[key].dtype, key
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def restore(workdir, step, target):
  with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    return ckpt.restore(step, target)


def test_round_trip_is_exact_and_survives_donation(tiny_config, tmp_path):
  tr = trainer.Trainer(tiny_config, str(tmp_path))
  state = tr.init_state()
  state = state.replace(step=state.step + 3, loss_state={"center": jnp.arange(4, dtype=jnp.bfloat16)})
  expected = jax.tree_util.tree_map(np.array, state)  # host copies
  with checkpointing.Checkpointer(tmp_path / "checkpoints") as ckpt:
    assert ckpt.save(3, state, {"seed": 0})
    # The save is asynchronous: the next step may donate and overwrite the state's buffers at once.
    state = jax.jit(lambda s: jax.tree_util.tree_map(lambda x: x + 1, s), donate_argnums=0)(state)
    ckpt.wait()
    assert not ckpt.save(3, state)  # that step exists: nothing is written
    target = checkpointing.abstract_target(jax.eval_shape(lambda: expected), tr.replicated)
    restored = ckpt.restore(3, target)
    assert ckpt.restore_config(3) == {"seed": 0}
  assert_trees_equal(restored, expected)
  assert restored.loss_state["center"].dtype == jnp.bfloat16 and restored.rng.dtype == expected.rng.dtype
  assert restored.student["backbone"]["cls_token"][...].sharding == tr.replicated


def test_killed_then_resumed_run_equals_uninterrupted(run_a, env, target, tmp_path):
  ckpt_dir = tmp_path / "checkpoints"
  with open(tmp_path / "first.log", "w") as log:
    proc = subprocess.Popen(cli(tmp_path), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
      while not (ckpt_dir / "4" / checkpointing.COMMIT_MARKER).exists():
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.005)
    finally:
      os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up: as a crash or a lost machine
      proc.wait()
  # If the process got further before the kill landed, make it a crash right after step 4's checkpoint.
  for path in ckpt_dir.iterdir():
    if path.name.split(".")[0].isdigit() and int(path.name.split(".")[0]) > 4:
      shutil.rmtree(path)

  out = subprocess.run(cli(tmp_path), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"resumed from step 4 ({ckpt_dir / '4'})" in out.stdout

  assert_trees_equal(restore(tmp_path, 6, target), restore(run_a, 6, target))  # student, teacher, opt_state...
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  reference = [json.loads(line) for line in (run_a / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # steps logged again after the resume not duplicated
  assert [r["loss"] for r in records] == [r["loss"] for r in reference]
  knn, knn_ref = (json.loads((d / "eval" / "knn.json").read_text()) for d in (tmp_path, run_a))
  assert knn["accuracy"] == knn_ref["accuracy"] and knn["accuracy_at_init"] == knn_ref["accuracy_at_init"]


def test_corrupt_checkpoints_fall_back_to_the_previous_one(run_a, target, tmp_path, caplog):
  directory = tmp_path / "checkpoints"
  shutil.copytree(run_a / "checkpoints", directory)
  assert sorted(os.listdir(directory)) == ["2", "4", "6"]  # checkpoint_keep=3
  for path in glob.glob(str(directory / "6" / "state" / "**" / "d" / "*"), recursive=True):
    with open(path, "r+b") as f:  # array files cut short
      f.truncate(os.path.getsize(path) // 2)
  os.remove(directory / "4" / checkpointing.COMMIT_MARKER)  # a save that never completed
  os.remove(directory / "2" / "state" / "manifest.ocdbt")  # a lost metadata file

  caplog.set_level(logging.WARNING)
  with checkpointing.Checkpointer(directory) as ckpt:
    assert ckpt.restore_latest(target) is None  # nothing usable: start from scratch
    assert ckpt.all_steps() == []
  for step in (6, 4, 2):
    assert any(f"checkpoint {directory / str(step)} is unusable" in r.getMessage() for r in caplog.records), step
  assert any(
    "no usable checkpoint" in r.getMessage() and "starting from scratch" in r.getMessage() for r in caplog.records
  )
  assert sorted(p.split(".")[0] for p in os.listdir(directory)) == ["2", "4", "6"]  # moved aside, not deleted

  # With a good checkpoint left underneath, the fall-back stops there.
  shutil.copytree(run_a / "checkpoints" / "2", directory / "2")
  shutil.copytree(run_a / "checkpoints" / "4", directory / "4")
  os.remove(directory / "4" / checkpointing.COMMIT_MARKER)
  with checkpointing.Checkpointer(directory) as ckpt:
    state, step = ckpt.restore_latest(target)
  assert step == 2 and int(state.step) == 2
  assert_trees_equal(state, restore(run_a, 2, target))


def test_checkpoint_of_another_config_is_refused_not_moved(run_a, tiny_config, tmp_path):
  directory = tmp_path / "checkpoints"
  shutil.copytree(run_a / "checkpoints", directory)
  other = trainer.Trainer(tiny_config, str(tmp_path))  # another model width and depth: shapes differ
  with checkpointing.Checkpointer(directory) as ckpt:
    with pytest.raises(checkpointing.CheckpointMismatchError, match=r"config\.model\.depth: checkpoint 1, this run 2"):
      ckpt.restore_latest(other.abstract_state(), config=checkpointing.config_dict(tiny_config))
  assert sorted(os.listdir(directory)) == ["2", "4", "6"]


def stop_with(signum, after: str, workdir, env) -> int:
  """Runs the CLI on ``workdir``, sends ``signum`` once a stdout line starts with ``after`` (the handler is
  installed before the evaluation at init and before a resume), checks that it saved a checkpoint and exited 75;
  returns the step it stopped at."""
  with open(workdir / "stderr.log", "w") as err:
    proc = subprocess.Popen(cli(workdir), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    seen = []
    for line in proc.stdout:
      seen.append(line)
      if line.startswith(after):
        break
    proc.send_signal(signum)  # SIGINT: what Ctrl-C sends
    stdout = "".join(seen) + proc.communicate(timeout=300)[0]
  # 75 (EX_TEMPFAIL, simdino_jax.train's EXIT_STOPPED): stopped after saving, re-run to resume.
  assert proc.returncode == 75, (workdir / "stderr.log").read_text()[-3000:]
  assert "Traceback" not in (workdir / "stderr.log").read_text()
  steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  stopped = steps[-1]
  assert stopped < 6, "the run finished before the signal"
  name = signal.Signals(signum).name
  assert f"{name}: stopped at step {stopped}/6, checkpoint {workdir / 'checkpoints' / str(stopped)}" in stdout
  assert (workdir / "checkpoints" / str(stopped) / checkpointing.COMMIT_MARKER).exists()
  assert not (workdir / "eval" / "knn.json").exists()  # stopped before the final evaluation
  assert not (workdir / "run.lock").exists()  # the workdir is free again
  return stopped


def test_sigterm_and_sigint_each_save_and_exit_75_and_the_rerun_ends_as_an_uninterrupted_run(
  run_a, env, target, tmp_path
):
  # One workdir through both signals (one CLI run fewer than a fresh run per signal): SIGTERM during the
  # evaluation at init, then SIGINT (what Ctrl-C sends) to the resumed run, then the run to its end.
  first = stop_with(signal.SIGTERM, "knn at init", tmp_path, env)
  second = stop_with(signal.SIGINT, f"resumed from step {first}", tmp_path, env)
  assert second >= first
  out = subprocess.run(cli(tmp_path), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0 and f"resumed from step {second}" in out.stdout, out.stderr[-3000:]
  assert_trees_equal(restore(tmp_path, 6, target), restore(run_a, 6, target))  # bit-identical end state


def test_a_flipped_byte_in_a_checkpoint_is_detected_and_the_previous_one_used(run_a, target, tmp_path, caplog):
  directory = tmp_path / "checkpoints"
  shutil.copytree(run_a / "checkpoints", directory)
  assert all((directory / step / checkpointing.CHECKSUMS).exists() for step in ("2", "4", "6"))
  files = [p for p in glob.glob(str(directory / "6" / "state" / "**" / "d" / "*"), recursive=True)]
  path = max(files, key=os.path.getsize)  # an array file: same size afterwards, different content
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0xFF]))
  caplog.set_level(logging.WARNING)
  with checkpointing.Checkpointer(directory) as ckpt:
    assert "corrupted after saving" in ckpt.verify(6)
    state, step = ckpt.restore_latest(target)
  assert step == 4 and int(state.step) == 4
  assert any(f"checkpoint {directory / '6'} is unusable" in r.getMessage() for r in caplog.records)
  assert any(p.startswith("6.unusable-") for p in os.listdir(directory))  # moved aside, kept


WRITER = """
import json, sys
import jax, numpy as np
sys.path.insert(0, {tests!r})
from test_checkpointing import cli_config, leaves
from simdino_jax.io import checkpointing
from simdino_jax.train import trainer
tr = trainer.Trainer(cli_config(), {workdir!r})
state = tr.init_state()
state, _ = tr.compiled_step()(state, next(tr.train_batches()))  # one step: optimizer state too
assert all(len(x.sharding.device_set) == {n} for x in jax.tree_util.tree_leaves(state))
with checkpointing.Checkpointer({workdir!r} + "/checkpoints") as ckpt:
  ckpt.save(1, state, checkpointing.config_dict(tr.config))
np.savez({workdir!r} + "/written.npz", **leaves(state))
"""


def test_checkpoint_written_on_8_devices_restores_on_1(run_a, env, target, tmp_path):
  script = WRITER.format(tests=os.path.join(ROOT, "tests"), workdir=str(tmp_path), n=NUM_DEVICES)
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert jax.device_count() == 1
  with checkpointing.Checkpointer(tmp_path / "checkpoints") as ckpt:
    state, step = ckpt.restore_latest(target)
  assert step == 1
  written = np.load(tmp_path / "written.npz")
  restored = leaves(state)
  assert restored.keys() == set(written.files)
  for key, value in restored.items():
    assert value.dtype == written[key].dtype, key
    np.testing.assert_array_equal(value, written[key], err_msg=key)
  assert all(x.sharding.device_set == {jax.devices()[0]} for x in jax.tree_util.tree_leaves(state))
