"""A run's directory: relative and ~ paths are resolved, and one run at a time holds it (simdino_jax/workdir.py)."""

import json
import os
import socket
import subprocess
import sys

import pytest

from simdino_jax import workdir as workdir_lib
from simdino_jax.train import trainer


def test_resolve_makes_local_paths_absolute_and_expands_home(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert workdir_lib.resolve("runs/a") == str(tmp_path / "runs" / "a")
  assert workdir_lib.resolve("~/x") == str(tmp_path / "home" / "x")  # bash leaves ~ alone after --workdir=
  assert workdir_lib.resolve("gs://bucket/run") == "gs://bucket/run"


def _lock_file(workdir, **owner):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, workdir_lib.LOCK_NAME), "w") as f:
    json.dump(
      dict({"host": socket.gethostname(), "started": "then", "command": "python -m simdino_jax.train"}, **owner), f
    )


def test_a_second_run_is_refused_with_the_owners_details(tmp_path):
  with workdir_lib.WorkdirLock(str(tmp_path)) as first:
    assert first.held and (tmp_path / workdir_lib.LOCK_NAME).exists()
    with pytest.raises(workdir_lib.WorkdirLockedError, match=rf"in use by pid {os.getpid()} on {socket.gethostname()}"):
      workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  assert not (tmp_path / workdir_lib.LOCK_NAME).exists()  # released at exit


def test_a_stale_lock_is_taken_over_and_another_hosts_lock_needs_force(tmp_path):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  _lock_file(str(tmp_path), pid=int(dead.stdout))  # that process has exited: the lock is stale
  said = []
  with workdir_lib.WorkdirLock(str(tmp_path), log=said.append) as lock:
    assert lock.held and "its owner is not running" in said[0]
  _lock_file(str(tmp_path), host="another-host", pid=1)
  with pytest.raises(workdir_lib.WorkdirLockedError, match="another host.*--force"):
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  with workdir_lib.WorkdirLock(str(tmp_path), force=True, log=said.append) as lock:
    assert lock.held and "forced" in said[-1]


def test_release_never_removes_a_lock_another_run_took_over(tmp_path):
  lock = workdir_lib.WorkdirLock(str(tmp_path))
  lock.acquire()
  _lock_file(str(tmp_path), pid=os.getpid(), start="another run's")  # e.g. taken over with --force meanwhile
  lock.release()
  assert (tmp_path / workdir_lib.LOCK_NAME).exists()


def test_a_relative_workdir_trains_saves_and_resumes(tiny_config, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  tiny_config.total_steps, tiny_config.checkpoint_every = 2, 1
  trainer.train(tiny_config, "runs/rel")  # orbax refuses relative paths: the trainer resolves them first
  assert sorted(os.listdir(tmp_path / "runs" / "rel" / "checkpoints")) == ["1", "2"]
  tiny_config.total_steps = 3
  result = trainer.train(tiny_config, "runs/rel")
  assert result["step"] == 3 and "resumed from step 2" in capsys.readouterr().out
  assert not any(".unusable" in name for name in os.listdir(tmp_path / "runs" / "rel" / "checkpoints"))


def test_a_run_on_a_locked_workdir_is_refused_before_writing(tiny_config, tmp_path):
  with workdir_lib.WorkdirLock(str(tmp_path)):  # a run in progress holds the directory
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(workdir_lib.WorkdirLockedError, match="in use by pid"):
      trainer.train(tiny_config, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == before  # nothing written: no config.json, metrics or checkpoints
