"""The recipe configs: each method's ImageNet-1k and CIFAR-10 files hold the values their docstrings promise, and
every CIFAR-10 variant trains (2 tiny steps, finite loss) through ``trainer.train``.

(tests/test_trainer.py::test_every_config_file_is_valid already loads and validates every file in configs/.)
"""

import json
import math
import os
import runpy

import pytest

from simdino_jax import config as config_lib
from simdino_jax import methods
from simdino_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs")
CONFIG_FILES = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".py"))
CIFAR_FILES = {f"cifar10_{m}.py": m for m in sorted(methods.METHODS)}
CIFAR_TAR = "/path/to/cifar10.tar"  # the recipes take it as their argument (or $SIMDINO_CIFAR10)
SIMDINOV2 = ("simdinov2_vitb16_in1k.py", "simdinov2_vitl16_in1k.py")


def load(name):
  get_config = runpy.run_path(os.path.join(CONFIG_DIR, name))["get_config"]
  return get_config(CIFAR_TAR) if name.startswith("cifar10_") else get_config()


def flat(config) -> dict:
  out = {}

  def walk(prefix, node):
    for key, value in node.items():
      if isinstance(value, dict):
        walk(f"{prefix}{key}.", value)
      else:
        out[prefix + key] = tuple(value) if isinstance(value, list) else value

  walk("", config.to_dict())
  return out


def diff(a, b) -> set:
  fa, fb = flat(a), flat(b)
  return {k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)}


def test_every_method_has_an_imagenet_and_a_cifar10_config():
  in1k = {load(f).method for f in CONFIG_FILES if f.endswith("_in1k.py")}
  assert in1k == set(methods.METHODS)
  for name, method in CIFAR_FILES.items():
    assert name in CONFIG_FILES, name
    assert load(name).method == method


@pytest.mark.parametrize("name", [f for f in CONFIG_FILES if f != "cifar10_common.py"])
def test_docstring_has_the_exact_command(name):
  text = open(os.path.join(CONFIG_DIR, name)).read()
  assert f"python -m simdino_jax.train --config=configs/{name} --workdir=" in text
  if name.startswith("cifar10_"):  # the measured runtime and k-NN, or where they will be
    assert "Runtime: " in text and ("Expected result (seed 0, measured)" in text or 'see docs/results.md' in text)


@pytest.mark.parametrize("name", SIMDINOV2)
def test_simdinov2_official_recipe(name):
  c = load(name)
  assert c.method == "simdinov2" and c.model.variant == ("B/16" if "vitb16" in name else "L/16")
  assert c.data.source == "tfds:imagenet2012" and c.total_epochs == 100 and c.batch_size == 1024
  m = c.model
  assert (m.num_registers, m.layerscale, m.drop_path_rate, m.drop_path_uniform) == (4, 0.1, 0.2, True)
  assert (m.token_init, m.interpolate_offset, m.interpolate_antialias) == ("dinov2", 0.0, True)
  assert not c.head.separate_patch_head and (c.head.hidden_dim, c.head.out_dim) == (2048, 256)
  assert (c.masking.probability, tuple(c.masking.ratio)) == (0.5, (0.1, 0.5))
  assert (c.loss.expansion, c.loss.exclude_same_view, c.loss.patch_weighting) == ("mean", True, "official")
  # Official 8 GPUs x 128 with reduce_cov=0, eps=0.05: per-device covariances, eps^2 = N * 0.05.
  assert c.loss.groups == 8 and c.batch_size // c.loss.groups == 128
  assert math.isclose(c.loss.eps**2, 8 * 0.05)
  assert math.isclose(methods.simdino.simdino_gamma(c), 1 / 256 + 1 / 1024)
  o = c.optim
  assert (o.lr, o.lr_scaling, o.warmup_from_min_lr) == (0.004, "sqrt_1024", True)
  assert (o.layer_decay, o.patch_embed_lr_mult, o.clip_grad, o.clip_mode) == (0.9, 0.2, 3.0, "per_module")
  assert (c.teacher.momentum, c.teacher.momentum_end) == (0.9, 1.0)
  assert (c.data.num_local, tuple(c.data.global_scale), tuple(c.data.local_scale)) == (10, (0.4, 1.0), (0.05, 0.4))


def test_simdinov2_vitl16_differs_from_vitb16_only_in_the_backbone():
  assert diff(load(SIMDINOV2[0]), load(SIMDINOV2[1])) == {"model.variant"}


def test_dino_is_the_simdino_comparison_recipe():
  c = load("dino_vitb16_in1k.py")
  assert c.method == "dino"
  assert (c.head.num_prototypes, c.head.norm_last_layer) == (65536, True)
  d = c.dino
  assert (d.warmup_teacher_temp, d.teacher_temp, d.warmup_teacher_temp_epochs) == (0.04, 0.07, 30)
  assert (d.student_temp, d.center_momentum, d.centering, d.koleo_weight) == (0.1, 0.9, "centering", 0.0)
  o = c.optim
  assert (o.lr, o.lr_scaling, o.clip_grad, o.clip_mode, o.freeze_last_layer_epochs) == (
    5e-4,
    "linear_256",
    3.0,
    "per_tensor",
    1.0,
  )
  assert (c.batch_size, c.data.num_local, c.model.drop_path_rate, c.model.drop_path_uniform) == (512, 10, 0.1, False)
  # Same recipe as SimDINO ViT-B/16 but for the method, its head / loss knobs and the linear protocol behind each
  # published figure (SimDINO: its README's eval_linear.py defaults; DINO: DINO's paper, 1 block + avgpool, lr sweep).
  changed = diff(c, load("simdino_vitb16_in1k.py"))
  assert all(
    k == "method" or k.startswith(("head.", "dino.", "evals.linear.")) or k == "optim.freeze_last_layer_epochs"
    for k in changed
  ), changed


def test_dinov2_baseline_recipe():
  c = load("dinov2_vitb16_in1k.py")
  assert c.method == "dinov2" and c.batch_size == 1024
  assert (c.head.num_prototypes, c.head.norm_last_layer, c.head.separate_patch_head) == (65536, False, False)
  assert (c.dino.centering, c.dino.koleo_weight, c.dino.ibot_weight) == ("centering", 0.1, 1.0)
  assert (c.model.layerscale, c.model.drop_path_rate, c.model.drop_path_uniform) == (1e-5, 0.3, True)
  assert c.teacher.momentum == 0.992 and c.optim.freeze_last_layer_epochs == 1.0
  assert (c.optim.layer_decay, c.optim.patch_embed_lr_mult, c.optim.clip_mode) == (0.9, 0.2, "per_module")
  # The SimDINOv2 fork's shared base: crops, registers, masks and optimiser as SimDINOv2's.
  changed = diff(c, load("simdinov2_vitb16_in1k.py"))
  assert not any(k.startswith(("data.", "masking.", "optim.lr", "loss.")) for k in changed), changed


def test_vmf_configs_use_unnormalised_prototypes():
  dino, dino_vmf, ibot_vmf = (load(f"{m}_vitb16_in1k.py") for m in ("dino", "dino_vmf", "ibot_vmf"))
  for c in (dino_vmf, ibot_vmf, load("cifar10_dino_vmf.py"), load("cifar10_ibot_vmf.py")):
    assert c.head.norm_last_layer is False and c.vmf.terms == 1
  # DINO recipe otherwise, evaluated with the DINO-vMF paper's few-shot l2 penalty (default: MSN's 0.0025).
  assert diff(dino, dino_vmf) == {"method", "head.norm_last_layer", "evals.fewshot.lambd"}
  assert dino_vmf.evals.fewshot.lambd == ibot_vmf.evals.fewshot.lambd == 0.075 and dino.evals.fewshot.lambd == 0.0025
  assert ibot_vmf.method == "ibot_vmf" and ibot_vmf.head.num_prototypes == 8192
  assert not ibot_vmf.head.separate_patch_head and ibot_vmf.data.num_local == 10
  assert (tuple(ibot_vmf.data.global_scale), tuple(ibot_vmf.data.local_scale)) == ((0.25, 1.0), (0.05, 0.25))
  assert (ibot_vmf.masking.probability, tuple(ibot_vmf.masking.ratio)) == (0.5, (0.1, 0.5))


# Two global crops and no local crops, at DINO's no-multi-crop scale (0.14, 1) (their files say why).
TWO_VIEW = {"moco_v2": ("data.num_local", "data.global_scale"), "byol": ("data.num_local", "data.global_scale")}


def test_cifar10_configs_share_one_recipe():
  configs = {name: load(name) for name in [*CIFAR_FILES, "cifar10_simdino_shared.py"]}
  for name, c in configs.items():
    assert c.data.source == "folder:" + CIFAR_TAR, name
    num_local = 0 if c.method in TWO_VIEW else 6
    assert (c.data.num_global, c.data.num_local, c.data.global_size, c.data.local_size) == (2, num_local, 32, 16), name
    assert tuple(c.data.augment.blur_sigma) == (0.1, 0.5), name
    assert (c.model.embed_dim, c.model.depth, c.model.num_heads, c.model.img_size) == (96, 4, 3, 32), name
    assert (c.head.hidden_dim, c.head.out_dim) == (1024, 128), name
    # One image budget: 64,000 images (1000 steps of 64; SimDINO's recipe: 2000 of 32), warm-up 6,400 images.
    assert (c.batch_size * c.total_steps, c.batch_size * c.warmup_steps) == (64_000, 6_400), name
    assert (c.batch_size, c.total_steps) in ((64, 1000), (32, 2000)), name
    assert (c.optim.lr, c.optim.lr_scaling) == (8e-3, "linear_256"), name  # 2e-3 at batch 64, 1e-3 at 32
    if methods.get_method(c.method).prototypes:  # SwAV's own recipe has 3000 prototypes (its ImageNet count)
      assert c.head.num_prototypes == (3000 if c.method == "swav" else 4096), name
      assert c.dino.warmup_teacher_temp_epochs == 1, name
      assert c.optim.freeze_last_layer_epochs in (0.0, 0.1), name
    config_lib.validate(c, num_devices=8)
  # The data pipeline and the optimiser's schedule are identical across methods (one shared recipe).
  shared = [
    k for k in flat(configs["cifar10_dino.py"]) if k.startswith("data.") or k in ("optim.lr", "optim.min_lr", "seed")
  ]
  for name, c in configs.items():
    keys = [k for k in shared if k not in TWO_VIEW.get(c.method, ())]
    assert {k: flat(c)[k] for k in keys} == {k: flat(configs["cifar10_dino.py"])[k] for k in keys}, name


def test_cifar10_simdino_shared_is_the_dino_recipe_with_simdinos_loss():
  # benchmarks/claims.py and collapse.py compare it with cifar10_dino.py on one backbone, batch and optimiser.
  # dino.teacher_temp: the DINO recipe search's temperature, a field SimDINO's loss never reads.
  assert diff(load("cifar10_simdino_shared.py"), load("cifar10_dino.py")) == {
    "method",
    "teacher.momentum",
    "dino.teacher_temp",
  }
  assert load("cifar10_simdino_shared.py").method == "simdino"


def test_cifar10_simdino_is_simdinov2s_backbone_at_batch_32_without_masks():
  simdino, v2 = load("cifar10_simdino.py"), load("cifar10_simdinov2.py")
  assert diff(simdino, v2) == {"method", "batch_size", "total_steps", "warmup_steps"}
  assert (simdino.model.num_registers, simdino.model.layerscale, simdino.optim.layer_decay) == (4, 0.1, 0.9)
  assert not methods.get_method(simdino.method).uses_masks  # the masked-patch term is SimDINOv2's


@pytest.mark.parametrize("name,method", sorted(CIFAR_FILES.items()))
def test_cifar10_config_trains_two_steps(name, method, tmp_path):
  c = load(name)
  c.data.source = "digits"  # bundled, no decoding: keeps the test fast
  c.batch_size, c.total_steps, c.warmup_steps, c.log_every, c.checkpoint_every = 8, 2, 1, 1, 0
  c.data.num_local = 0 if method in TWO_VIEW else 2  # MoCo-v2 and BYOL take the two global crops only
  c.model.depth, c.model.embed_dim, c.model.num_heads = 1, 32, 2
  c.head.hidden_dim, c.head.out_dim, c.head.num_prototypes = 64, 32, 64
  result = trainer.train(c, str(tmp_path))
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2]
  assert all(math.isfinite(r["loss"]) for r in records)
  keys = {
    "simdino": ("align", "rate"),
    "simdinov2": ("align", "patch_align", "rate"),
    "dino": ("ce",),
    "dinov2": ("ce", "ibot_ce", "koleo"),
    "dino_vmf": ("ce", "kappa_mean"),
    "ibot_vmf": ("ce", "ibot_ce", "kappa_mean"),
    "swav": ("swav", "teacher_entropy"),
    "moco_v2": ("info_nce", "top1"),
    "byol": ("byol", "cosine"),
  }[method]
  for key in keys:
    assert all(math.isfinite(r[key]) for r in records), key
  m = methods.get_method(method)
  for r in records:  # the collapse monitors every step, and the progress line's terms (but the optional ones)
    assert 0 <= r["feature_std"] and 1 <= r["effective_rank"] <= c.batch_size + 1e-3
    assert all(k in r for k in m.progress_line_keys if k not in ("regularizer", "koleo")), (m.progress_line_keys, r)
    if m.prototypes:
      assert 0 < r["prototypes_used"] <= c.head.num_prototypes and r["teacher_entropy"] >= 0
  assert 0 <= result["accuracy"] <= 100 and result["step"] == 2
  # The network the official evaluation reads: MoCo's main_lincls.py keeps encoder_q, BYOL's eval_experiment.py the
  # online params; the DINO family (and SwAV's model itself) the teacher.
  evaluated = "student" if method in TWO_VIEW else "teacher"
  assert json.loads((tmp_path / "eval" / "knn.json").read_text())["features"] == f"{evaluated} backbone"
