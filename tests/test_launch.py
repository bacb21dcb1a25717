"""launch/: the shell scripts pass shellcheck, print their usage, and compose the right commands (DRY_RUN=1);
prepare_data.sh converts an archive in the official CIFAR-10 format into a tar the folder source reads; the Colab
notebook is valid nbformat v4 and its code cells run on a CPU in tiny mode (SIMDINO_COLAB_TINY=1).
"""

import io
import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ("tpu_pod.sh", "gpu.sh", "prepare_data.sh", "multihost.sh", "slurm.sbatch")
NOTEBOOK = os.path.join(LAUNCH, "colab.ipynb")


def bash(script, *args, env=None, check_rc=None):
  out = subprocess.run(
    ["bash", os.path.join(LAUNCH, script), *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env=dict(os.environ, **(env or {})),
    timeout=600,
  )  # a hang guard only: a loaded 2-core machine can take minutes
  if check_rc is not None:
    assert out.returncode == check_rc, (out.stdout[-2000:], out.stderr[-2000:])
  return out


def dry_run_commands(stderr):
  """The argv of each command a script printed as '+ cmd args...' (printf %q quoting)."""
  return [shlex.split(line[2:]) for line in stderr.splitlines() if line.startswith("+ ")]


# ---- shell scripts ----------------------------------------------------------------------------------------------
def test_scripts_pass_shellcheck():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
  out = subprocess.run(["shellcheck", *(os.path.join(LAUNCH, s) for s in SCRIPTS)], capture_output=True, text=True)
  assert out.returncode == 0, out.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_strict_executable_and_print_usage(script):
  path = os.path.join(LAUNCH, script)
  text = open(path).read()
  assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
  assert os.access(path, os.X_OK)
  out = bash(script, check_rc=2)  # no arguments
  assert f"launch/{script}" in out.stderr and out.stdout == ""


def test_tpu_pod_dry_run_creates_installs_and_trains_on_every_worker():
  env = {
    "DRY_RUN": "1",
    "ACCELERATOR_TYPE": "v4-64",
    "ZONE": "us-central2-b",
    "TFDS_DATA_DIR": "gs://b/tfds",
    "SPOT": "1",
  }
  out = bash(
    "tpu_pod.sh",
    "all",
    "configs/simdino_vits16_in1k.py",
    "gs://b/runs/s16",
    "--config.batch_size=1024",
    env=env,
    check_rc=0,
  )
  create, scp, copy, install, train = dry_run_commands(out.stderr)
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "simdino-pod"]
  assert {"--accelerator-type=v4-64", "--version=tpu-ubuntu2204-base", "--zone=us-central2-b", "--spot"} <= set(create)
  assert scp[4] == "scp" and "--worker=all" in scp
  for cmd in (copy, install, train):
    assert cmd[4:6] == ["ssh", "simdino-pod"] and "--worker=all" in cmd
  (command,) = [a[len("--command=") :] for a in install if a.startswith("--command=")]
  assert 'pip install -q -e "./simdino_jax[tpu]"' in command
  (command,) = [a[len("--command=") :] for a in train if a.startswith("--command=")]
  inner = shlex.split(command)[3]  # nohup bash -c <training command>
  assert "export TFDS_DATA_DIR=gs://b/tfds" in inner
  train_cmd, _, after = inner.partition("; rc=$?")
  # The trainer runs in the background of the nohup wrapper, which records ITS pid for `stop` and waits on it.
  assert train_cmd.endswith(
    "python -m simdino_jax.train --config=configs/simdino_vits16_in1k.py "
    "--workdir=gs://b/runs/s16 --config.batch_size=1024 & echo $! > ~/simdino_train.pid; wait $!"
  )
  # The exit code is kept for `status`; 75 (stopped after a checkpoint) is reported as "resume".
  assert "echo $rc > ~/simdino_train.exit" in after and "exit 75" in after and after.endswith("exit $rc")

  out = bash("tpu_pod.sh", "train", "configs/demo.py", "/tmp/local", env={"DRY_RUN": "1"}, check_rc=1)
  assert "must be a gs:// path" in out.stderr
  out = bash("tpu_pod.sh", "copy", env={"DRY_RUN": "1", "CODE_SOURCE": "git"}, check_rc=1)
  assert "needs REPO_URL" in out.stderr
  out = bash(
    "tpu_pod.sh", "copy", env={"DRY_RUN": "1", "CODE_SOURCE": "git", "REPO_URL": "https://x/y.git"}, check_rc=0
  )
  (ssh,) = dry_run_commands(out.stderr)
  assert "--worker=all" in ssh and any("git clone --quiet https://x/y.git" in a for a in ssh)


def test_gpu_dry_run_and_its_xla_flags_are_known_to_xla():
  out = bash(
    "gpu.sh",
    "configs/cifar10_simdino.py",
    "/tmp/w",
    "--config.batch_size=256",
    env={"DRY_RUN": "1", "VENV": "/nonexistent/venv", "XLA_FLAGS": "--xla_dump_to=/tmp/dump"},
    check_rc=0,
  )
  cmds = dry_run_commands(out.stderr)
  assert cmds[0] == ["python3", "-m", "venv", "/nonexistent/venv"]
  assert cmds[2] == ["/nonexistent/venv/bin/python", "-m", "pip", "install", "-q", "-e", ".[cuda]"]
  assert cmds[-1] == [
    "/nonexistent/venv/bin/python",
    "-m",
    "simdino_jax.train",
    "--config=configs/cifar10_simdino.py",
    "--workdir=/tmp/w",
    "--config.batch_size=256",
  ]
  (flags_line,) = [line for line in out.stderr.splitlines() if line.startswith("XLA_FLAGS=")]
  xla_flags = flags_line.split(" XLA_PYTHON_CLIENT_MEM_FRACTION=")[0][len("XLA_FLAGS=") :]
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in xla_flags and xla_flags.endswith("--xla_dump_to=/tmp/dump")
  assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9" in flags_line
  # XLA parses every flag (GPU ones included) on any backend and aborts on an unknown one.
  check = subprocess.run(
    [sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"],
    env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags.split(" --xla_dump_to")[0]),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert check.returncode == 0, check.stderr[-2000:]


def fake_cifar10_archive(path, per_batch=2):
  """A .tar.gz laid out as the official cifar-10-python.tar.gz, with `per_batch` images per batch file (every
  class present in the training batches, as in the real data)."""
  rng = np.random.default_rng(0)
  names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
  files = {"batches.meta": {b"label_names": names, b"num_cases_per_batch": per_batch}}
  expected = {"train": [], "test": []}
  for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
    data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
    labels = [(k * per_batch + i) % 10 for i in range(per_batch)]
    files[name] = {b"data": data, b"labels": labels, b"filenames": [b"x.png"] * per_batch}
    split = "test" if name == "test_batch" else "train"
    expected[split] += [(d.reshape(3, 32, 32).transpose(1, 2, 0), y) for d, y in zip(data, labels)]
  with tarfile.open(path, "w:gz") as tar:
    for name, content in files.items():
      blob = pickle.dumps(content)
      info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))
  return expected


def test_prepare_data_converts_cifar10_into_a_folder_source_tar(tmp_path):
  from simdino_jax.data.sources import load_source

  expected = fake_cifar10_archive(tmp_path / "cifar-10-python.tar.gz")
  out = bash(
    "prepare_data.sh",
    "cifar10",
    str(tmp_path / "cifar-10-python.tar.gz"),
    str(tmp_path / "c10.tar"),
    env={"PYTHON": sys.executable},
    check_rc=0,
  )
  assert "wrote 10 train + 2 test images of 10 classes" in out.stdout
  assert f"--config.data.source=folder:{tmp_path / 'c10.tar'}" in out.stdout
  for split in ("train", "test"):
    source = load_source(f"folder:{tmp_path / 'c10.tar'}", split)
    got = sorted((source[i]["image"].tobytes(), int(source[i]["label"])) for i in range(len(source)))
    assert got == sorted((image.tobytes(), label) for image, label in expected[split])  # lossless, official labels

  (tmp_path / "tree" / "train" / "a").mkdir(parents=True)
  (tmp_path / "tree" / "train" / "a" / "x.png").write_bytes(b"")
  out = bash("prepare_data.sh", "folder", str(tmp_path / "tree"), str(tmp_path / "t.tar"), check_rc=0)
  assert tarfile.open(tmp_path / "t.tar").getnames() == ["train", "train/a", "train/a/x.png"]
  bash("prepare_data.sh", "folder", str(tmp_path / "c10.tar"), str(tmp_path / "u.tar"), check_rc=1)


# ---- notebook ---------------------------------------------------------------------------------------------------
def notebook():
  with open(NOTEBOOK) as f:
    return json.load(f)


def test_notebook_is_valid_nbformat_v4():
  nb = notebook()
  assert nb["nbformat"] == 4
  code = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert len(code) >= 5 and all(not c["outputs"] and c["execution_count"] is None for c in code)
  source = "".join("".join(c["source"]) for c in code)
  assert "REPO_URL = " in source and "pip" in source and "configs/demo.py" in source
  assert "configs/cifar10_simdino.py" in source and "metrics.jsonl" in source and "knn.json" in source
  nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install -e '.[test]')")
  nbformat.validate(nbformat.read(NOTEBOOK, as_version=4))


def notebook_script():
  """The code cells as one script; IPython shell and magic lines (! or %) are left out."""
  lines = []
  for cell in notebook()["cells"]:
    if cell["cell_type"] == "code":
      source = "".join(cell["source"])
      lines += [line for line in source.splitlines() if not line.lstrip().startswith(("!", "%"))] + [""]
  return "\n".join(lines)


def test_notebook_runs_on_cpu_in_tiny_mode(tmp_path):
  # The notebook's tiny demo run is tests/test_export.py's training run: with the session's compilation cache
  # (tests/conftest.py, inherited through os.environ), whichever runs second compiles nothing.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  (tmp_path / "notebook.py").write_text(notebook_script())
  work = tmp_path / "runs"
  env.update(
    SIMDINO_COLAB_TINY="1",
    SIMDINO_COLAB_REPO_DIR=ROOT,
    SIMDINO_COLAB_WORK_DIR=str(work),
    SIMDINO_COLAB_CIFAR10_TAR=str(tmp_path / "absent.tar"),
    MPLBACKEND="Agg",
  )
  out = subprocess.run(
    [sys.executable, str(tmp_path / "notebook.py")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
  )
  assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
  assert "tiny: True" in out.stdout
  assert f"skipped: {tmp_path / 'absent.tar'} does not exist" in out.stdout
  steps = [json.loads(line)["step"] for line in (work / "demo" / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2]
  knn = json.loads((work / "demo" / "eval" / "knn.json").read_text())
  assert f"demo: k-NN top-1 {knn['accuracy']:.2f}%" in out.stdout
  assert (work / "curves.png").stat().st_size > 1000
  from simdino_jax.io.formats import load_arrays

  arrays = load_arrays(work / "demo_teacher_backbone.safetensors")
  assert "backbone/blocks/0/attn/qkv/kernel" in arrays and f"{len(arrays)} arrays" in out.stdout


def test_gpu_suite_is_valid_bash_and_prints_its_usage():
  script = os.path.join(ROOT, "benchmarks", "gpu_suite.sh")
  assert subprocess.run(["bash", "-n", script], capture_output=True, timeout=60).returncode == 0
  out = subprocess.run(["bash", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert out.returncode == 2 and "usage: bash benchmarks/gpu_suite.sh OUTDIR" in out.stderr


# ---- stopping a run: the signal reaches the trainer ----------------------------------------------------------------
# A stand-in trainer: records its pid and arguments, exits 75 on SIGTERM as simdino_jax.train does after its
# checkpoint. The scripts' signal delivery is what is tested, not the trainer (tests/test_trainer.py covers that).
STANDIN_TRAINER = """#!/usr/bin/env bash
echo $$ > "${STANDIN_PID:-$HOME/trainer.pid}"
echo "$@" > "${STANDIN_PID:-$HOME/trainer.pid}.args"
trap 'echo "stand-in trainer: SIGTERM, exit 75"; exit 75' TERM
while true; do sleep 0.05; done
"""
# A stand-in gcloud: `compute tpus tpu-vm ssh NAME --worker=all --command=CMD` runs CMD as two local workers, each with
# its own home directory ($GCLOUD_WORKERS/w0, w1); every other gcloud command succeeds doing nothing.
STANDIN_GCLOUD = """#!/usr/bin/env bash
cmd=""
for a in "$@"; do case "$a" in --command=*) cmd=${a#--command=} ;; esac; done
[ -n "$cmd" ] || exit 0
for w in w0 w1; do HOME="$GCLOUD_WORKERS/$w" bash -c "$cmd"; done
"""


def _write_exe(path, text):
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, 0o755)


def _wait_for(cond, what, timeout=120.0):
  import time

  deadline = time.monotonic() + timeout  # a hang guard only: no assertion on how long it takes
  while time.monotonic() < deadline:
    if cond():
      return
    time.sleep(0.1)
  raise AssertionError(f"timed out waiting for {what}")


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def _read(path):
  return open(path).read().strip() if os.path.exists(path) else ""


def test_tpu_pod_stop_signals_the_trainer_on_every_worker_and_status_reports_exit_75(tmp_path):
  bindir = tmp_path / "bin"
  bindir.mkdir()
  _write_exe(bindir / "gcloud", STANDIN_GCLOUD)
  workers = [tmp_path / w for w in ("w0", "w1")]
  for home in workers:
    (home / "simdino_jax").mkdir(parents=True)
    (home / "simdino_venv" / "bin").mkdir(parents=True)
    (home / "simdino_venv" / "bin" / "activate").write_text(f'export PATH="{home}/simdino_venv/bin:$PATH"\n')
    _write_exe(home / "simdino_venv" / "bin" / "python", STANDIN_TRAINER)
  env = {"PATH": f"{bindir}:{os.environ['PATH']}", "GCLOUD_WORKERS": str(tmp_path)}
  pids = []
  try:
    bash("tpu_pod.sh", "train", "configs/demo.py", "gs://b/run", "--config.batch_size=8", env=env, check_rc=0)
    for home in workers:
      _wait_for(lambda: _read(home / "trainer.pid") and _read(home / "simdino_train.pid"), f"{home} to start")
      pids.append(int(_read(home / "trainer.pid")))
      # The pid file holds the trainer itself, not the nohup wrapper around it.
      assert int(_read(home / "simdino_train.pid")) == pids[-1]
      assert _read(home / "trainer.pid.args").endswith("--workdir=gs://b/run --config.batch_size=8")
    out = bash("tpu_pod.sh", "status", env=env, check_rc=0)
    assert out.stdout.count(": training (pid") == 2, out.stdout
    bash("tpu_pod.sh", "stop", env=env, check_rc=0)
    for home, pid in zip(workers, pids):
      _wait_for(lambda: _read(home / "simdino_train.exit") == "75", f"{home}'s exit code 75")
      _wait_for(lambda: not _alive(pid), f"{home}'s trainer to exit")
      assert "stopped after saving a checkpoint" in _read(home / "simdino_train.log")
    out = bash("tpu_pod.sh", "status", env=env, check_rc=0)
    assert out.stdout.count("not training (last exit code: 75") == 2, out.stdout
  finally:
    for home in workers:
      pid = _read(home / "trainer.pid")
      if pid and _alive(int(pid)):
        os.kill(int(pid), 9)


def test_gpu_sh_becomes_the_trainer_so_sigterm_to_it_stops_with_exit_75(tmp_path):
  import signal

  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  _write_exe(venv / "bin" / "python", STANDIN_TRAINER)
  pid_file = tmp_path / "trainer.pid"
  env = dict(os.environ, SKIP_INSTALL="1", VENV=str(venv), STANDIN_PID=str(pid_file))
  proc = subprocess.Popen(
    ["bash", os.path.join(LAUNCH, "gpu.sh"), "configs/demo.py", str(tmp_path / "run")],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    _wait_for(lambda: _read(pid_file), "the stand-in trainer to start")
    assert int(_read(pid_file)) == proc.pid  # exec: the pid a user or scheduler signals is the trainer's
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
  finally:
    if proc.poll() is None:
      proc.kill()


# ---- several hosts: launch/multihost.sh, launch/slurm.sbatch and the launchers sharding.py detects -----------------
# What each process of a simulated pod reports once sharding.maybe_initialize_distributed has run: the branch taken,
# its place in the pod, a cross-process sum (a real collective over gloo) and the GPUs JAX would let it see.
POD_DRIVER = """
import json, os, sys
import jax
import numpy as np
from jax.experimental import multihost_utils
from simdino_jax import sharding
env = sharding.distributed_environment()
started = sharding.maybe_initialize_distributed()
ranks = multihost_utils.process_allgather(np.int32(jax.process_index() + 1))
print("POD " + json.dumps(dict(
  env=env, started=started, count=jax.process_count(), index=jax.process_index(), sum=int(np.sum(ranks)),
  gpus=jax.config.read("jax_cuda_visible_devices"), pid=os.getpid(), argv=sys.argv[1:])), flush=True)
"""


def _pod_reports(procs, out_dir):
  import pod

  pod.finish(procs, out_dir, timeout=300, what="simulated pod")  # a hang guard only
  reports = []
  for k in range(len(procs)):
    text = (out_dir / f"process{k}.log").read_text()
    lines = [line for line in text.splitlines() if line.startswith("POD ")]
    assert len(lines) == 1, pod.log_tails(out_dir, len(procs))
    reports.append(json.loads(lines[0][4:]))
  return reports


def _launcher_port_free(port):
  import socket

  with socket.socket() as s:
    try:
      s.bind(("", port))
    except OSError:
      return False
  return True


def _launcher_job_port():
  """A free port in the range jax derives its coordinator port from a SLURM or Open MPI job id (61440 + id mod 4096)."""
  import random

  for port in random.sample(range(61440, 65536), 200):
    if _launcher_port_free(port):
      return port
  pytest.skip("no free port in 61440-65535")


def _launcher_envs(launcher, port):
  """Two processes' environments as SLURM (one task per host, or one per GPU), Open MPI (one process per host) or a
  forced start with the JAX_* variables would give them, on this machine."""
  import pod

  def clean(env):  # nothing from a launcher this test itself may run under
    return {k: v for k, v in env.items() if not k.startswith(("SLURM_", "OMPI_", "SIMDINO_DISTRIBUTED"))}

  if launcher == "forced":
    return [dict(clean(env), SIMDINO_DISTRIBUTED="1") for env in pod.envs(2)]
  base = clean(pod.envs(1)[0])
  if launcher == "openmpi":  # jax: coordinator = the launcher's address; port from the job id (a multiple of 4096)
    uri = f"{(port - 61440) * 4096}.0;tcp://127.0.0.1:1"
    return [
      dict(
        base,
        OMPI_MCA_orte_hnp_uri=uri,
        OMPI_COMM_WORLD_SIZE="2",
        OMPI_COMM_WORLD_RANK=str(k),
        OMPI_COMM_WORLD_LOCAL_RANK="0",
        OMPI_COMM_WORLD_LOCAL_SIZE="1",
      )
      for k in range(2)
    ]
  per_gpu = launcher == "slurm-task-per-gpu"  # both tasks on one node (local ids 0, 1) instead of one per node
  return [
    dict(
      base,
      SLURM_JOB_ID=str(port - 61440 + 4096 * 7),
      SLURM_STEP_NODELIST="localhost",
      SLURM_NTASKS="2",
      SLURM_PROCID=str(k),
      SLURM_LOCALID=str(k if per_gpu else 0),
      SLURM_NODEID=str(0 if per_gpu else k),
      SLURM_STEP_NUM_NODES="1" if per_gpu else "2",
      SLURM_NNODES="1" if per_gpu else "2",
    )
    for k in range(2)
  ]


@pytest.mark.parametrize("launcher", ["slurm", "slurm-task-per-gpu", "openmpi", "forced"])
def test_launcher_environments_start_a_real_two_process_run(tmp_path, launcher):
  """The SLURM, Open MPI and forced branches of sharding.maybe_initialize_distributed, for real: two local processes
  with the variables those launchers set join one jax.distributed run. One process per host must see all its GPUs
  (JAX's default under SLURM / Open MPI is the one GPU of the local rank); one task per GPU keeps JAX's choice."""
  procs = []
  for k, env in enumerate(_launcher_envs(launcher, _launcher_job_port())):
    log = open(tmp_path / f"process{k}.log", "w")
    procs.append((subprocess.Popen([sys.executable, "-c", POD_DRIVER], cwd=ROOT, env=env, stdout=log, stderr=log), log))
  reports = _pod_reports(procs, tmp_path)
  expected_env = {"slurm-task-per-gpu": "slurm"}.get(launcher, launcher)
  gpus = ["0", "1"] if launcher == "slurm-task-per-gpu" else ["all", "all"]
  got = [(r["env"], r["started"], r["count"], r["index"], r["sum"], r["gpus"]) for r in reports]
  assert got == [(expected_env, True, 2, k, 3, gpus[k]) for k in range(2)]


def test_multihost_sh_dry_run_exports_the_pod_variables():
  env = {"DRY_RUN": "1", "COORDINATOR": "node0:12345", "NUM_PROCESSES": "4", "PROCESS_ID": "3", "VENV": "/v"}
  out = bash("multihost.sh", "configs/demo.py", "/shared/run", "--config.batch_size=64", env=env, check_rc=0)
  assert "JAX_COORDINATOR_ADDRESS=node0:12345 JAX_NUM_PROCESSES=4 JAX_PROCESS_ID=3" in out.stderr
  (cmd,) = dry_run_commands(out.stderr)
  assert cmd == [
    "/v/bin/python",
    "-m",
    "simdino_jax.train",
    "--config=configs/demo.py",
    "--workdir=/shared/run",
    "--config.batch_size=64",
  ]


@pytest.mark.parametrize(
  "variables, message",
  [
    ({}, "COORDINATOR is not set"),
    ({"COORDINATOR": "node0"}, "COORDINATOR=node0 is not HOST:PORT"),
    ({"COORDINATOR": "node0:1"}, "NUM_PROCESSES is not set"),
    ({"COORDINATOR": "node0:1", "NUM_PROCESSES": "two"}, "NUM_PROCESSES=two is not a positive integer"),
    ({"COORDINATOR": "node0:1", "NUM_PROCESSES": "2"}, "PROCESS_ID is not set"),
    ({"COORDINATOR": "node0:1", "NUM_PROCESSES": "2", "PROCESS_ID": "2"}, "PROCESS_ID=2 is not an integer from 0 to 1"),
  ],
)
def test_multihost_sh_refuses_a_missing_or_bad_variable_in_one_line(variables, message):
  env = {k: "" for k in ("COORDINATOR", "NUM_PROCESSES", "PROCESS_ID")} | variables
  out = bash("multihost.sh", "configs/demo.py", "/shared/run", env=dict(env, PYTHON="/nonexistent"), check_rc=1)
  (line,) = out.stderr.splitlines()  # one line, naming the variable
  assert line.startswith("multihost.sh: ") and message in line and out.stdout == ""


def test_multihost_sh_on_two_processes_becomes_the_trainer_of_a_real_pod(tmp_path):
  """multihost.sh's variables reach jax.distributed: two processes started with it form one run (the stand-in
  'python' runs POD_DRIVER with the trainer's arguments), and each is the pid its multihost.sh had (exec)."""
  import pod

  (tmp_path / "driver.py").write_text(POD_DRIVER)
  _write_exe(tmp_path / "python", f'#!/usr/bin/env bash\nexec "{sys.executable}" "{tmp_path / "driver.py"}" "$@"\n')
  (base,) = pod.envs(1)
  coordinator = f"127.0.0.1:{pod.free_port()}"
  procs = []
  for k in range(2):
    env = dict(base, COORDINATOR=coordinator, NUM_PROCESSES="2", PROCESS_ID=str(k), PYTHON=str(tmp_path / "python"))
    log = open(tmp_path / f"process{k}.log", "w")
    argv = ["bash", os.path.join(LAUNCH, "multihost.sh"), "configs/demo.py", "/shared/run", "--config.seed=3"]
    procs.append((subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=log), log))
  pids = [p.pid for p, _ in procs]
  reports = _pod_reports(procs, tmp_path)
  assert [(r["env"], r["count"], r["index"], r["sum"], r["pid"]) for r in reports] == [
    ("coordinator", 2, k, 3, pids[k]) for k in range(2)
  ]
  assert reports[0]["argv"] == [
    "-m",
    "simdino_jax.train",
    "--config=configs/demo.py",
    "--workdir=/shared/run",
    "--config.seed=3",
  ]


def test_slurm_sbatch_dry_run_runs_one_task_per_node_with_the_cpus_of_the_task():
  text = open(os.path.join(LAUNCH, "slurm.sbatch")).read()
  for directive in ("--ntasks-per-node=1", "--signal=B:USR1@120", "--requeue", "--open-mode=append"):
    assert f"#SBATCH {directive}\n" in text
  env = {"DRY_RUN": "1", "VENV": "/v", "SLURM_CPUS_PER_TASK": "12", "SLURM_SUBMIT_DIR": ROOT, "SKIP_INSTALL": "1"}
  out = bash("slurm.sbatch", "configs/demo.py", "/shared/run", "--config.batch_size=64", env=env, check_rc=0)
  (cmd,) = dry_run_commands(out.stderr)
  assert cmd == [
    "srun",
    "--ntasks-per-node=1",
    "--cpus-per-task=12",
    "/v/bin/python",
    "-m",
    "simdino_jax.train",
    "--config=configs/demo.py",
    "--workdir=/shared/run",
    "--config.batch_size=64",
  ]
  out = bash("slurm.sbatch", "configs/demo.py", "/r", env=dict(env, SLURM_SUBMIT_DIR="/tmp"), check_rc=1)
  assert out.stderr.strip() == "slurm.sbatch: /tmp is not the repository root: submit from there (or set REPO_DIR)"


# Stand-ins: srun runs its one local task (it becomes the trainer), `scancel --signal=TERM JOB` sends SIGTERM to that
# task as SLURM does to every task of the job, scontrol records what it was asked.
STANDIN_SRUN = """#!/usr/bin/env bash
echo "$@" > "$STANDIN_LOG.srun"
while [ "${1#--}" != "$1" ]; do shift; done
exec "$@"
"""
STANDIN_SCANCEL = """#!/usr/bin/env bash
echo "$@" >> "$STANDIN_LOG.scancel"
[ "$*" = "--signal=TERM $SLURM_JOB_ID" ] && kill -TERM "$(cat "$STANDIN_PID")"
"""
STANDIN_SCONTROL = """#!/usr/bin/env bash
echo "$@" >> "$STANDIN_LOG.scontrol"
"""


@pytest.mark.parametrize("stop", ["time limit", "scancel --signal=TERM"])
def test_slurm_sbatch_stops_the_trainer_and_requeues_only_at_the_time_limit(tmp_path, stop):
  """SLURM's time-limit signal (SIGUSR1 to the batch shell, --signal=B:USR1@120) becomes a SIGTERM to the trainers
  through scancel (srun would SIGKILL its tasks on a SIGTERM), and their exit 75 a requeue. A user's
  `scancel --signal=TERM` (SIGTERM to the tasks; here also to the batch shell, as when the job ends) stops with exit
  75 and no requeue: the batch shell does not die of its SIGTERM."""
  import signal

  bindir, venv = tmp_path / "bin", tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  bindir.mkdir()
  _write_exe(bindir / "srun", STANDIN_SRUN)
  _write_exe(bindir / "scontrol", STANDIN_SCONTROL)
  _write_exe(bindir / "scancel", STANDIN_SCANCEL)
  _write_exe(venv / "bin" / "python", STANDIN_TRAINER)
  log = tmp_path / "standin"
  env = dict(
    os.environ,
    PATH=f"{bindir}:{os.environ['PATH']}",
    SKIP_INSTALL="1",
    VENV=str(venv),
    STANDIN_PID=str(tmp_path / "trainer.pid"),
    STANDIN_LOG=str(log),
    SLURM_JOB_ID="4242",
    SLURM_SUBMIT_DIR=ROOT,
    SLURM_CPUS_PER_TASK="4",
  )
  proc = subprocess.Popen(
    ["bash", os.path.join(LAUNCH, "slurm.sbatch"), "configs/demo.py", str(tmp_path / "run")],
    cwd=tmp_path,  # sbatch runs a copy of the script elsewhere: the repository comes from SLURM_SUBMIT_DIR
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    _wait_for(lambda: _read(tmp_path / "trainer.pid"), "the stand-in trainer to start")
    trainer = int(_read(tmp_path / "trainer.pid"))
    assert _read(tmp_path / "trainer.pid.args").endswith(f"--config=configs/demo.py --workdir={tmp_path / 'run'}")
    assert _read(f"{log}.srun").startswith("--ntasks-per-node=1 --cpus-per-task=4 ")
    if stop == "time limit":
      proc.send_signal(signal.SIGUSR1)
    else:
      proc.send_signal(signal.SIGTERM)
      os.kill(trainer, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert not _alive(trainer)
    assert _read(f"{log}.scancel") == ("--signal=TERM 4242" if stop == "time limit" else ""), err
    assert _read(f"{log}.scontrol") == ("requeue 4242" if stop == "time limit" else ""), err
  finally:
    if proc.poll() is None:
      proc.kill()
    pid = _read(tmp_path / "trainer.pid")
    if pid and _alive(int(pid)):
      os.kill(int(pid), 9)
