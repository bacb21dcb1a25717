"""benchmarks/official_parity_classic.py: MoCo-v2 and SwAV against their official training steps (same weights, same
batches), and the command-line checks.

The parity runs need PyTorch and clones of facebookresearch/moco, /swav (and /dino for MoCo's ViT encoder), none a
dependency of the package: they run when SIMDINO_TORCH_PYTHON is a Python with torch and simdino_jax and
SIMDINO_OFFICIAL_DIR holds the clones (moco/, swav/, dino/), and are skipped with the reason otherwise.
SIMDINO_PARITY_STEPS (default 3) sets their length.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "official_parity_classic.py")
STEPS = int(os.environ.get("SIMDINO_PARITY_STEPS", "3"))
STEP0_TOL, LOSS_TOL, PARAM_TOL = 1e-5, 1e-3, 1e-3  # the float32 goals of official_parity.py
# MoCo's teacher moves by (1 - m) = 1e-3 of the student's update per step: after a few steps its update is a few ulps
# of its weights, where the two EMA roundings (p * m + q * (1 - m) in torch, optax's form here) weigh; reported, not
# bounded at float32 (it agrees to ~1e-15 in float64: docs/parity.md).


def _run(args, python=sys.executable, timeout=60):
  return subprocess.run([python, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_help_works_without_torch():
  out = _run(["--help"])
  assert out.returncode == 0, out.stderr
  assert "--official_repo" in out.stdout and "moco_v2" in out.stdout and "swav" in out.stdout


@pytest.mark.parametrize(
  "args, message",
  [
    (["--method", "swav"], "--official_repo is required"),
    (["--method", "moco_v2", "--official_repo", "/nonexistent/clone"], "no such directory"),
    (["--method", "swav", "--arch", "vit", "--official_repo", "/tmp"], "swav is compared on a ResNet"),
  ],
)
def test_refuses_bad_arguments_with_one_line(args, message):
  out = _run(args)
  assert out.returncode == 2 and out.stdout == ""
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and message in lines[0] and lines[0].startswith("official_parity_classic.py: error:"), lines


def test_refuses_a_clone_of_the_wrong_repository(tmp_path):
  out = _run(["--method", "moco_v2", "--official_repo", str(tmp_path)])
  assert out.returncode == 2 and "moco/builder.py not found" in out.stderr
  assert len(out.stderr.strip().splitlines()) == 1


def _parity_run(method, *extra):
  python, clones = os.environ.get("SIMDINO_TORCH_PYTHON"), os.environ.get("SIMDINO_OFFICIAL_DIR")
  if not python or not clones:
    pytest.skip(
      "needs SIMDINO_TORCH_PYTHON (a Python with torch and simdino_jax) and SIMDINO_OFFICIAL_DIR (clones moco/, "
      "swav/, dino/ of the official repositories)"
    )
  need = {"moco_v2": ("moco", "dino"), "swav": ("swav",)}[method]
  missing = [c for c in need if not os.path.isdir(os.path.join(clones, c))]
  if missing:
    pytest.skip(f"SIMDINO_OFFICIAL_DIR={clones} has no {', '.join(missing)} clone")
  out = _run(
    ["--method", method, "--official_repo", clones, "--steps", str(STEPS), "--batch_size", "8", *extra],
    python=python,
    timeout=3600,
  )
  assert out.returncode == 0, out.stderr[-4000:]
  lines = [l for l in out.stdout.splitlines() if l.strip()]
  assert len(lines) == 1, out.stdout[-2000:]
  return json.loads(lines[0])


def _assert_parity(r, method):
  report = json.dumps({k: v for k, v in r.items() if k not in ("patches", "official_repo")})
  assert r["method"] == method and len(r["losses_official"]) == STEPS, report
  assert r["step0_rel_diff"] <= STEP0_TOL and r["max_loss_rel_diff"] <= LOSS_TOL, report
  assert r["student_param_rel_diff"] <= PARAM_TOL and r["student_update_rel_diff"] <= PARAM_TOL, report
  assert max(r["student_param_rel_diff_per_step"]) <= PARAM_TOL and r["max_lr_rel_diff"] <= 1e-6, report
  assert r["parity"], report


def test_moco_v2_parity_with_the_official_step():
  """moco/builder.py's MoCo (--mlp, T 0.2, m 0.999, our queue) in main_moco.py's train with its SGD, on DINO's ViT-Ti
  with an fc: losses, the student, the key encoder and the queue (before every step and at the end)."""
  r = _parity_run("moco_v2", "--queue_size", "32", "--out_dim", "32")
  _assert_parity(r, "moco_v2")
  assert r["teacher_param_rel_diff"] <= PARAM_TOL and r["queue_rel_diff"] <= PARAM_TOL, r
  assert max(r["queue_rel_diff_per_step"]) <= PARAM_TOL and r["queue_ptr"][0] == r["queue_ptr"][1], r


# SwAV in float32 separates from the second real update on (its lr is 20x DINO's ResNet lr on this preset, and BN
# biases' gradients are small differences of large terms: docs/parity.md), so it is held in float64, where the same
# computation agrees to rounding whatever its sensitivity.
FLOAT64_TOL = 1e-10


def test_swav_parity_with_the_official_step_in_float64():
  """main_swav.py's train (Sinkhorn-Knopp, prototype normalisation, prototypes frozen for the first iteration) with
  src/resnet50.py's ResNet (resnet18's blocks) and LARC(SGD), both sides in float64: losses, parameters before every
  step, the update and the BN running statistics to 1e-10."""
  # With apex's LARC around the SGD (a transcription in the harness), as main_swav.py and the ResNet-50 recipe.
  r = _parity_run(
    "swav",
    "--float64",
    "--freeze_prototypes_iters",
    "1",
    "--num_prototypes",
    "64",
    "--hidden_dim",
    "64",
    "--optimizer",
    "larc",
  )
  report = json.dumps({k: v for k, v in r.items() if k not in ("patches", "official_repo")})
  assert r["preset"]["dtype"].startswith("float64") and len(r["losses_official"]) == STEPS, report
  assert r["max_loss_rel_diff"] <= FLOAT64_TOL and max(r["student_param_rel_diff_per_step"]) <= FLOAT64_TOL, report
  assert r["student_param_rel_diff"] <= FLOAT64_TOL and r["student_update_rel_diff"] <= FLOAT64_TOL, report
  assert r["bn_stats_rel_diff"]["student"]["max"] <= FLOAT64_TOL, report
  assert r["preset"]["optimizer"].startswith("larc"), report


def test_moco_v2_resnet_parity_with_the_official_step_in_float64():
  """builder.py's encoder_q(im_q) / encoder_k(im_k) on torchvision's resnet18: the query and key batches normalised
  apart, each encoder's running statistics from its own view (ours: Method.view_calls), both sides in float64:
  losses, the student, the key encoder, both networks' BN statistics and the queue to 1e-10."""
  r = _parity_run("moco_v2", "--arch", "resnet18", "--float64", "--queue_size", "32", "--out_dim", "32")
  report = json.dumps({k: v for k, v in r.items() if k not in ("patches", "official_repo")})
  assert r["preset"]["dtype"].startswith("float64") and len(r["losses_official"]) == STEPS, report
  assert r["max_loss_rel_diff"] <= FLOAT64_TOL and max(r["student_param_rel_diff_per_step"]) <= FLOAT64_TOL, report
  assert r["student_param_rel_diff"] <= FLOAT64_TOL and r["teacher_param_rel_diff"] <= FLOAT64_TOL, report
  assert max(r["bn_stats_rel_diff"][n]["max"] for n in ("student", "teacher")) <= FLOAT64_TOL, report
  assert r["queue_rel_diff"] <= FLOAT64_TOL and r["queue_ptr"][0] == r["queue_ptr"][1], report
