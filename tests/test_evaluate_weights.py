"""evaluate --weights=FILE on an official-layout PyTorch checkpoint: the same k-NN figures as DINO's own
``eval_knn.py`` classifier fed with ``load_backbone`` features of the file; a .pth without PyTorch installed is
refused in one line; the architecture of official weights comes from their shapes, the head count and the
positional-embedding interpolation from the config. (--weights on our own npz export: tests/test_evaluate_run.py.)

The official comparison needs PyTorch and the DINO clone, neither a dependency of the package: it runs when
SIMDINO_TORCH_PYTHON is a Python with torch and simdino_jax and SIMDINO_OFFICIAL_DIR holds the clones (dino/);
otherwise it is skipped with the reason.
"""

import importlib.util
import json
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tests", "official_weights_knn.py")


def test_official_dino_pth_gives_the_knn_of_the_official_classifier(tmp_path):
  python, clones = os.environ.get("SIMDINO_TORCH_PYTHON"), os.environ.get("SIMDINO_OFFICIAL_DIR")
  if not python or not clones:
    pytest.skip(
      "needs SIMDINO_TORCH_PYTHON (a Python with torch and simdino_jax) and SIMDINO_OFFICIAL_DIR (a folder holding "
      "the dino clone) to save an official DINO ViT with torch and run eval_knn.py's knn_classifier"
    )
  out = subprocess.run(
    [python, DRIVER, os.path.join(clones, "dino"), str(tmp_path)],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  ours, official = r["ours"], r["official"]
  assert set(ours["per_k"]) == {"10", "20", "100", "200"}
  assert ours["per_k"] == official  # top-1 and top-5 at every k, exactly (both count the same hits)
  assert ours["accuracy"] == official[str(ours["k"])]["top1"] and ours["top5"] == official[str(ours["k"])]["top5"]
  assert r["feature_diff"] < 1e-4  # load_backbone vs the torch model on the same views
  assert ours["weights"] == r["pth"] and ours["step"] is None and ours["dtype"] == "float32"
  assert ours["num_train"] == 1438 and ours["num_test"] == 359


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="PyTorch is installed here")
def test_a_pth_without_pytorch_is_refused_in_one_line(tmp_path):
  path = tmp_path / "dino.pth"
  with zipfile.ZipFile(path, "w") as z:  # torch.save's zip layout, as far as the file-type check reads it
    z.writestr("archive/data.pkl", b"")
  out = subprocess.run(
    [sys.executable, "-m", "simdino_jax.evaluate", f"--weights={path}", "--config=configs/demo.py"]
    + [f"--output={tmp_path / 'out'}", "--eval=knn"],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS="cpu", SIMDINO_NO_TCMALLOC="1"),
    capture_output=True,
    text=True,
    timeout=300,
  )
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 1 and len(lines) == 1, out.stderr
  assert lines[0].startswith(f"simdino_jax.evaluate: error: {path}: reading a PyTorch .pth file needs PyTorch")


def _official_file(tmp_path, **vit):
  """A safetensors file with a random VisionTransformer's weights in the official DINOv2 names and layout, prefixed
  as SimDINOv2's teacher_checkpoint.pth is ({"teacher": {"backbone.*", "dino_head.*"}} flattened), no metadata."""
  import numpy as np
  from flax import nnx

  from simdino_jax.io import formats, torch_interop
  from simdino_jax.models.vit import VisionTransformer
  from simdino_jax.tree import named_leaves

  abstract = nnx.split(nnx.eval_shape(lambda: VisionTransformer(**vit, rngs=nnx.Rngs(0))))[1]  # shapes only
  rng = np.random.default_rng(0)
  ours = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in named_leaves(abstract).items()}
  state = torch_interop.to_torch(ours)
  arrays = {f"teacher.backbone.{k}": v for k, v in state.items()}
  arrays["teacher.dino_head.mlp.0.weight"] = np.zeros((8, vit["embed_dim"]), np.float32)
  path = str(tmp_path / "official.safetensors")
  formats.save_safetensors(arrays, path)
  return path


def test_the_architecture_of_official_weights_comes_from_the_file_and_the_config(tmp_path):
  from simdino_jax import config as config_lib
  from simdino_jax import evaluate
  from simdino_jax.errors import ConfigError

  vit = dict(patch_size=4, embed_dim=128, depth=3, num_heads=4, img_size=24, num_registers=2, layerscale_init=0.1)
  path = _official_file(tmp_path, **vit)
  config = config_lib.base_config()  # B/16, 224: nothing of it fits the file but what the file cannot say
  config.model.interpolate_offset, config.model.interpolate_antialias = 0.0, True
  kwargs, params, step, model = evaluate.load_weights(config, path, "teacher")
  assert (kwargs["embed_dim"], kwargs["depth"], kwargs["patch_size"], kwargs["img_size"]) == (128, 3, 4, 24)
  assert kwargs["num_registers"] == 2 and kwargs["layerscale_init"] is not None and step is None
  assert kwargs["num_heads"] == 2  # not stored: width / 64, as every official ViT
  assert kwargs["interpolate_offset"] == 0.0 and kwargs["interpolate_antialias"] is True  # the config's
  assert (model.embed_dim, model.depth, model.num_heads, model.num_registers) == (128, 3, 2, 2)
  assert model.variant == "B/4" and model.img_size == 24 and model.layerscale > 0
  assert set(params) >= {"cls_token", "register_tokens", "blocks/2/ls2/gamma"}

  config.model.num_heads = 4  # alone (embed_dim 0): the user's head count for this file
  assert evaluate.load_weights(config, path, "teacher")[0]["num_heads"] == 4
  config.model.num_heads = 3
  with pytest.raises(ConfigError, match=r"^config.model.num_heads: .*width 128, which 3 heads do not divide"):
    evaluate.load_weights(config, path, "teacher")
