"""benchmarks/step_throughput.py prints one JSON line whose figures agree with each other, and reports the ratio
to the official PyTorch step when given one (faked here: PyTorch is not a dependency)."""

import json
import os
import subprocess
import sys
import textwrap

import pod
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "step_throughput.py")
TINY = [
  "--preset",
  "cpu-vit-tiny",
  "--batch_size",
  "4",
  "--steps",
  "2",
  "--warmup",
  "1",
  "--notcmalloc",
  "--set",
  "model.variant=mu/4",
  "--set",
  "model.embed_dim=32",
  "--set",
  "model.depth=2",
  "--set",
  "model.num_heads=2",
  "--set",
  "head.hidden_dim=64",
  "--set",
  "head.out_dim=16",
]


def run(args, tmp_path, devices=1):
  env = pod.env(devices)
  out = subprocess.run(
    [sys.executable, SCRIPT, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
  )
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [l for l in out.stdout.splitlines() if l.strip()]
  assert len(lines) == 1, out.stdout
  return json.loads(lines[0])


PEAK = 1.0  # TFLOP/s, for the MFU


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  """One 1-device run serving both tests below: rounds against a stand-in for the torch Python (it checks the
  arguments it is given and reports a fixed rate), with a peak for the MFU."""
  tmp_path = tmp_path_factory.mktemp("step_benchmark")
  fake = tmp_path / "fake_torch_python"
  fake.write_text(
    textwrap.dedent(f"""\
      #!{sys.executable}
      import json, sys
      args = sys.argv[2:]
      assert sys.argv[1].endswith("official_step_torch.py"), sys.argv
      assert args[args.index("--official_repo") + 1] == "/some/SimDINO", args
      assert args[args.index("--batch_size") + 1] == "4", args
      print("noise before the result line")
      print(json.dumps({{"images_per_sec": 0.5, "torch_version": "fake", "threads": 2}}))
      """)
  )
  fake.chmod(0o755)
  args = [*TINY, "--rounds", "2", "--torch_python", str(fake), "--official_repo", "/some/SimDINO"]
  return run([*args, "--peak_tflops", str(PEAK)], tmp_path)


def test_step_benchmark_reports_consistent_figures_and_the_ratio_to_a_reference(one_device):
  r = one_device
  assert r["batch_size"] == 4 and r["steps"] == 4 and r["crops"] == "2x32 + 6x16"
  assert abs(r["images_per_sec"] - 4 / (r["step_time_ms"] / 1e3)) < 0.02 * r["images_per_sec"]
  assert r["step_time_ms_min"] <= r["step_time_ms"] <= r["step_time_ms_max"]
  assert r["flops_per_image"] > 0 and r["allocator"] in ("tcmalloc", "default") and r["loss"] == r["loss"]
  assert r["reference_images_per_sec"] == [0.5, 0.5]
  per_round = r["images_per_sec_per_round"]
  assert len(per_round) == 2
  for ours, ratio in zip(per_round, r["ratio_to_reference_per_round"]):
    assert abs(ratio - ours / 0.5) < 0.01 * ratio + 0.01
  assert min(r["ratio_to_reference_per_round"]) <= r["ratio_to_reference"] <= max(r["ratio_to_reference_per_round"])


def test_step_flops_and_mfu_count_every_device(one_device, tmp_path):
  # XLA's cost analysis of a partitioned step is one device's share: the per-image FLOPs must not halve on 2 devices,
  # and the per-device rate (what the MFU divides by the peak) is the whole step's rate over the device count.
  one = one_device
  two = run([*TINY, "--steps", "1", "--warmup", "0", "--peak_tflops", str(PEAK)], tmp_path, devices=2)
  assert one["num_devices"] == 1 and two["num_devices"] == 2
  ratio = two["flops_per_image"] / one["flops_per_image"]
  assert abs(ratio - 1) < 0.02, ratio
  for r in (one, two):
    rate = r["flops_per_image"] * r["batch_size"] / (r["step_time_ms"] / 1e3) / 1e12 / r["num_devices"]
    assert abs(r["achieved_tflops_per_device"] - rate) <= 0.01 * rate + 1e-3
    assert abs(r["mfu"] - rate / PEAK) <= 0.01 * rate / PEAK + 1e-4


def test_step_benchmark_refuses_a_reference_without_the_official_repo(tmp_path):
  out = subprocess.run(
    [sys.executable, SCRIPT, "--torch_python", sys.executable, "--notcmalloc"],
    cwd=tmp_path,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode != 0 and "--official_repo" in out.stderr
