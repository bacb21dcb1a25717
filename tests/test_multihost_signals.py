"""Stopping a multi-process run (issue 27, items 3 and 4): signals, the workdir lock, the JAX_* variables.

A simulated 2-host pod (tests/pod.py: two processes on 127.0.0.1, one CPU device each) trains configs/demo.py,
shrunk. One workdir goes through a chain of runs, each checked on its own, and its end is compared with an
uninterrupted run of the same command:

  SIGTERM to process 1 only -> both processes stop at one agreed step with a checkpoint, exit 75
  re-run, SIGINT to both (Ctrl-C in a terminal) -> the same, no KeyboardInterrupt traceback
  re-run, a second signal to both -> both abort at once (die of the signal), no new checkpoint, none hangs
  re-run -> resumes and finishes: final student and teacher bitwise equal to an uninterrupted run's (one process
  with the pod's two devices, one process less than a pod)

A live lock of another host on the workdir is refused by both processes in the same one line, before anything is
compiled, and a JAX_* variable missing or out of range is one line naming it (a single process is enough).

Before the fix (measured on HEAD's trainer): SIGINT to both exited -2 (130) with a KeyboardInterrupt traceback on
each process and no checkpoint; a second SIGTERM 0.3 s after the first was swallowed (JAX's SIGTERM notifier); on a
locked workdir process 0 refused in one line and process 1 waited in its first collective and died ~30 s later of
"Gloo context initialization failed: DEADLINE_EXCEEDED"; JAX_COORDINATOR_ADDRESS without JAX_NUM_PROCESSES was
JAX's "Number of processes must be defined." traceback and JAX_PROCESS_ID=x silently became process 0.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pod
import pytest

from simdino_jax.io import restore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 100  # a signal sent once training has started lands mid-run, with a margin of ~90 steps
OVERRIDES = {  # the demo, shrunk: ~20 steps/s on two loaded cores; compilation and start-up dominate
  "total_steps": STEPS,
  "batch_size": 8,
  "model.embed_dim": 32,
  "model.depth": 1,
  "model.num_heads": 2,
  "head.hidden_dim": 64,
  "head.out_dim": 32,
  "data.num_local": 2,
  "log_every": 1,
  "checkpoint_every": 1000,  # only the stop's checkpoint (and the final one)
  "evals.knn.every": 0,
  "evals.knn.at_init": False,
  "evals.knn.final": False,
}
STOP_GUARD_S = 300  # generous hang guard for a pod that was told to stop or abort


def argv(workdir) -> list[str]:
  return ["-m", "simdino_jax.train", f"--config={ROOT}/configs/demo.py", f"--workdir={workdir}"] + [
    f"--config.{k}={v}" for k, v in OVERRIDES.items()
  ]


def start(workdir, out_dir):
  return pod.start(argv(workdir), out_dir, 2, new_session=True)


def logged_steps(workdir) -> list[int]:
  """Steps of metrics.jsonl's complete lines (process 0 writes it as it trains)."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      text = f.read()
  except FileNotFoundError:
    return []
  return [json.loads(line)["step"] for line in text.splitlines(keepends=True) if line.endswith("\n")]


def wait_for_training(workdir, procs, out_dir, after: int) -> None:
  """Blocks until metrics.jsonl logs a step past ``after`` (this run trains); fails if a process exits first."""
  deadline = time.time() + pod.TIMEOUT_S
  while time.time() < deadline:
    if any(s > after for s in logged_steps(workdir)):
      return
    if any(p.poll() is not None for p, _ in procs):
      pod.finish(procs, out_dir, expect=None)
      pytest.fail(f"the pod exited before training past step {after}:\n{pod.log_tails(out_dir, 2)}")
    time.sleep(0.1)
  pod.finish(procs, out_dir, timeout=1, expect=None)
  pytest.fail(f"no step past {after} logged in {pod.TIMEOUT_S} s:\n{pod.log_tails(out_dir, 2)}")


def signal_pod(procs, signum, who=(0, 1)) -> None:
  for k in who:
    os.killpg(procs[k][0].pid, signum)  # the process's own group (new_session): what a terminal would signal


def logs(out_dir) -> list[str]:
  return [open(os.path.join(out_dir, f"process{k}.log")).read() for k in range(2)]


def final_params(workdir) -> dict:
  return {
    which: restore.restore_params(str(workdir), which=which, step=STEPS, with_head=True)[0]
    for which in ("student", "teacher")
  }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Final parameters of an uninterrupted run of the same command as ONE process with two devices (one process less
  than a pod; tests/test_multihost_train.py shows the pod trains bitwise as this process does)."""
  base = tmp_path_factory.mktemp("reference")
  workdir = base / "run"
  pod.finish(pod.start(argv(workdir), base / "logs", 1, 2), base / "logs", what="uninterrupted run")
  assert "resumed" not in open(os.path.join(base / "logs", "process0.log")).read()
  assert logged_steps(workdir)[-1] == STEPS
  return final_params(workdir)


def stop_and_check(workdir, out_dir, signum, who, after: int, reason: str) -> int:
  """Runs the pod on ``workdir``, sends ``signum`` to the processes ``who`` once it trains past step ``after``, and
  checks that both stopped at one step with a checkpoint and exit 75; returns that step."""
  procs = start(workdir, out_dir)
  wait_for_training(workdir, procs, out_dir, after)
  signal_pod(procs, signum, who)
  pod.finish(procs, out_dir, timeout=STOP_GUARD_S, expect=75, what=f"pod after {signal.Signals(signum).name}")
  stopped = logged_steps(workdir)[-1]
  assert after < stopped < STEPS, "the run finished before the signal"
  log0, log1 = logs(out_dir)
  line = f"{reason}: stopped at step {stopped}/{STEPS}, checkpoint {workdir / 'checkpoints' / str(stopped)}; "
  assert line in log0, log0[-3000:]
  for log in (log0, log1):
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
  assert stopped in restore.committed_steps(workdir / "checkpoints")
  assert not (workdir / "run.lock").exists()
  return stopped


def test_signals_stop_every_process_at_one_step_and_the_rerun_ends_bitwise_equal(reference, tmp_path):
  workdir = tmp_path / "run"
  # SIGTERM to one process only (a scheduler's notice reaching one host): process 0 learns it from the service.
  first = stop_and_check(workdir, tmp_path / "sigterm_one", signal.SIGTERM, (1,), 0, "SIGTERM on process 1")
  # Ctrl-C in a terminal: SIGINT to every process.
  second = stop_and_check(workdir, tmp_path / "sigint_all", signal.SIGINT, (0, 1), first, "SIGINT")
  assert "resumed from step" in logs(tmp_path / "sigint_all")[0]

  # A second signal aborts every process at once: SIGTERM then SIGINT (two kinds, which the kernel cannot merge
  # into one pending signal), to both. Each dies of the second signal it sees, before any stop checkpoint.
  out_dir = tmp_path / "abort"
  procs = start(workdir, out_dir)
  wait_for_training(workdir, procs, out_dir, second)
  signal_pod(procs, signal.SIGTERM)
  signal_pod(procs, signal.SIGINT)
  codes = pod.finish(procs, out_dir, timeout=STOP_GUARD_S, expect=None)
  assert all(c in (-signal.SIGTERM, -signal.SIGINT) for c in codes), f"{codes}\n{pod.log_tails(out_dir, 2)}"
  for log in logs(out_dir):
    assert "again: aborting without a checkpoint" in log, log[-3000:]
  assert restore.committed_steps(workdir / "checkpoints") == [first, second]

  # The same command once more: resumes from the last stop (the aborted run's lock is stale) and finishes.
  out_dir = tmp_path / "finish"
  pod.finish(start(workdir, out_dir), out_dir, what="resumed pod")
  assert f"resumed from step {second}" in logs(out_dir)[0]
  assert logged_steps(workdir)[-1] == STEPS
  got = final_params(workdir)
  for which, params in reference.items():
    assert got[which].keys() == params.keys()
    for name, value in params.items():
      np.testing.assert_array_equal(got[which][name], value, err_msg=f"{which}/{name}")


def test_a_locked_workdir_is_refused_by_every_process_in_one_line(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  owner = {"host": "another-host", "pid": 4242, "start": None, "started": "today", "command": "python -m ..."}
  (workdir / "run.lock").write_text(json.dumps(owner))
  out_dir = tmp_path / "logs"
  pod.finish(start(workdir, out_dir), out_dir, timeout=STOP_GUARD_S, expect=1, what="pod on a locked workdir")
  errors = [[line for line in log.splitlines() if "error" in line.lower()] for log in logs(out_dir)]
  assert errors[0] == errors[1] and len(errors[0]) == 1, errors
  assert errors[0][0].startswith(f"simdino_jax.train: error: {workdir} is in use by pid 4242 on another-host")
  for log in logs(out_dir):
    assert "Traceback" not in log and "DEADLINE_EXCEEDED" not in log, log[-3000:]
  assert "simdino_jax: method=" not in logs(out_dir)[0]  # refused before the run started (nothing compiled)
  assert json.loads((workdir / "run.lock").read_text()) == owner  # not taken over


BAD_VARIABLES = [
  ({"JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES is not set"),
  ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "x"}, "JAX_PROCESS_ID='x' is not an integer"),
  ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "JAX_PROCESS_ID=2 must be below JAX_NUM_PROCESSES=2"),
]
# The CLI's main() once per case in ONE fresh process (jax.distributed.initialize refuses to run once a backend is up,
# as it is in the pytest process): each case's SystemExit message (what Python prints as the one stderr line of exit
# status 1), or the name of anything else it raised.
BAD_VARIABLES_CHECK = """
import json, os, sys
from absl import flags
from simdino_jax.train.__main__ import define_flags, main
for variables in json.loads(sys.argv[1]):
  for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    os.environ.pop(name, None)
  os.environ.update(variables)
  try:
    flag_values = define_flags(flags.FlagValues())
    flag_values(["simdino_jax.train", *sys.argv[2:]])
    main([], flag_values)
    outcome = "returned"
  except SystemExit as e:
    outcome = e.code
  except BaseException as e:  # a traceback in the CLI
    outcome = ["raised", type(e).__name__, str(e)]
  print("OUTCOME " + json.dumps(outcome), flush=True)
"""


@pytest.fixture(scope="module")
def bad_variable_outcomes(tmp_path_factory):
  env = dict(pod.envs(1)[0], JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{pod.free_port()}")
  cases = json.dumps([variables for variables, _ in BAD_VARIABLES])
  flags = argv(tmp_path_factory.mktemp("bad_variables") / "run")[2:]  # the training command's flags
  out = subprocess.run(
    [sys.executable, "-c", BAD_VARIABLES_CHECK, cases, *flags],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  outcomes = [json.loads(line[len("OUTCOME ") :]) for line in out.stdout.splitlines() if line.startswith("OUTCOME ")]
  assert len(outcomes) == len(BAD_VARIABLES), out.stdout[-3000:]
  return outcomes


@pytest.mark.parametrize("case", range(len(BAD_VARIABLES)), ids=[named.split()[0] for _, named in BAD_VARIABLES])
def test_a_bad_pod_variable_is_one_line_naming_it(bad_variable_outcomes, case):
  outcome = bad_variable_outcomes[case]
  named = BAD_VARIABLES[case][1]
  # sys.exit(str): Python prints the string as the one stderr line and exits with status 1.
  assert isinstance(outcome, str) and "\n" not in outcome, outcome
  assert outcome.startswith(f"simdino_jax.train: error: {named}"), outcome
