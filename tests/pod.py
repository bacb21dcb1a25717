"""A simulated pod on one machine for the tests: N python processes on 127.0.0.1 joined by ``jax.distributed``.

Each process is started with the coordinator recipe that ``sharding.maybe_initialize_distributed`` reads
(``JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=N JAX_PROCESS_ID=k``; CPU collectives use gloo) and
``devices_per_process`` CPU devices; N = 1 is a plain single process (the reference the pods are compared with).
Stdout and stderr go to ``out_dir/process{k}.log``; a failure shows every process's log tail.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

TIMEOUT_S = 600  # generous: two cores shared with other work; a hung collective fails the test instead of blocking


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def xla_flags(devices: int) -> str:
  """``devices`` CPU devices, and the parent's other XLA flags (the suite's compile-time flags, conftest.py), so that
  every subprocess of a comparison compiles the same way."""
  rest = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
  return " ".join([f"--xla_force_host_platform_device_count={devices}", *rest])


def env(devices: int = 1, **extra) -> dict:
  """The environment of a one-process subprocess with ``devices`` CPU devices (``extra`` added)."""
  return envs(1, devices, **extra)[0]


def envs(processes: int, devices_per_process: int = 1, **extra) -> list[dict]:
  """The environment of each process of a pod (``extra`` added to every one); inherited JAX_* pod variables are
  dropped so that a test run inside a pod does not leak them."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS"))}
  env.update(XLA_FLAGS=xla_flags(devices_per_process), JAX_PLATFORMS="cpu", **extra)
  if processes == 1:
    return [env]
  env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", JAX_NUM_PROCESSES=str(processes))
  return [dict(env, JAX_PROCESS_ID=str(k)) for k in range(processes)]


def start(argv: list[str], out_dir, processes: int, devices_per_process: int = 1, *, new_session=False, **extra):
  """Starts ``python *argv`` as the ``processes`` processes of one pod; returns [(Popen, log file)].
  ``new_session``: each process leads its own process group (a test may then signal it like a terminal would)."""
  os.makedirs(out_dir, exist_ok=True)
  procs = []
  for k, env in enumerate(envs(processes, devices_per_process, **extra)):
    log = open(os.path.join(out_dir, f"process{k}.log"), "w")
    procs.append(
      (
        subprocess.Popen(
          [sys.executable, *argv], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=new_session
        ),
        log,
      )
    )
  return procs


def log_tails(out_dir, processes: int, chars: int = 3000) -> str:
  return "".join(
    f"--- process {k} ---\n" + open(os.path.join(out_dir, f"process{k}.log")).read()[-chars:] for k in range(processes)
  )


def finish(procs, out_dir, *, timeout: float = TIMEOUT_S, expect=0, what: str = "pod") -> list:
  """Waits for every process (killing all on a timeout); their exit codes, which must all equal ``expect`` (None:
  not checked) or the test fails with every process's log tail."""
  try:
    codes = [p.wait(timeout=timeout) for p, _ in procs]
  except subprocess.TimeoutExpired:
    codes = ["timed out"] * len(procs)
  finally:
    for p, log in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
      log.close()
  if expect is not None and any(c != expect for c in codes):
    pytest.fail(
      f"{what} of {len(procs)} process(es) exited with {codes} (expected {expect}):\n{log_tails(out_dir, len(procs))}"
    )
  return codes
