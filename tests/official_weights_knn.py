"""Driver of tests/test_evaluate_weights.py, run by a Python with PyTorch (SIMDINO_TORCH_PYTHON): a randomly
initialised official DINO ViT (facebookresearch/dino ``vision_transformer.py``) saved with torch.save in the layout
of DINO's full checkpoints (teacher / student with their prefixes, a head, the argparse ``args``), evaluated by ``python -m simdino_jax.evaluate --weights=`` (k-NN on the demo recipe's
digits), and the official ``eval_knn.py`` ``knn_classifier`` fed with ``load_backbone`` features of the same file.

  python tests/official_weights_knn.py DINO_CLONE WORKDIR  -> prints one JSON line: {"ours": ..., "official": ...}

``eval_knn.py`` imports torchvision at the top; only its ``knn_classifier`` is loaded (its source, through ``ast``),
so neither torchvision nor its main runs. ``vision_transformer.py`` imports only torch and DINO's ``utils``.
"""

import argparse
import ast
import json
import os
import subprocess
import sys
from functools import partial

import numpy as np
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH, DEPTH, HEADS, PATCH, SIZE = 64, 2, 2, 4, 16  # width / 64 = 1 head: the heads come from --config.model


def official_knn_classifier(dino: str):
  """eval_knn.py's knn_classifier, its source run alone (the module imports torchvision at the top)."""
  path = os.path.join(dino, "eval_knn.py")
  with open(path) as f:
    tree = ast.parse(f.read())
  fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "knn_classifier")
  namespace = {"torch": torch}
  exec(compile(ast.Module(body=[fn], type_ignores=[]), path, "exec"), namespace)
  return namespace["knn_classifier"]


def main(dino: str, workdir: str) -> None:
  sys.path.insert(0, dino)
  import vision_transformer as vits  # pylint: disable=import-outside-toplevel

  torch.manual_seed(0)
  vit = vits.VisionTransformer(
    img_size=[SIZE],
    patch_size=PATCH,
    embed_dim=WIDTH,
    depth=DEPTH,
    num_heads=HEADS,
    mlp_ratio=4,
    qkv_bias=True,
    norm_layer=partial(nn.LayerNorm, eps=1e-6),
  ).eval()
  with torch.no_grad():  # the official init leaves LayerNorms at 1 / 0 and the tokens small: move everything
    for p in vit.parameters():
      p.add_(0.05 * torch.randn_like(p))
  teacher = {f"backbone.{k}": v for k, v in vit.state_dict().items()}
  teacher["head.mlp.0.weight"] = torch.randn(32, WIDTH)  # a DINO head next to the backbone: ignored
  student = {f"module.backbone.{k}": v + 0.1 * torch.randn_like(v) for k, v in vit.state_dict().items()}
  path = os.path.join(workdir, "checkpoint.pth")
  args = argparse.Namespace(arch="vit_tiny", patch_size=PATCH, out_dim=32, lr=0.0005)  # main_dino.py saves its args
  torch.save({"teacher": teacher, "student": student, "epoch": 1, "args": args}, path)

  out_dir = os.path.join(workdir, "out")
  overrides = [f"--config.model.embed_dim={WIDTH}", f"--config.model.num_heads={HEADS}"]
  run = subprocess.run(
    [sys.executable, "-m", "simdino_jax.evaluate", f"--weights={path}", "--config=configs/demo.py", "--eval=knn"]
    + [f"--output={out_dir}", *overrides],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS="cpu", SIMDINO_NO_TCMALLOC="1"),
    capture_output=True,
    text=True,
    timeout=600,
  )
  if run.returncode:
    raise SystemExit(f"evaluate failed: {run.stderr[-3000:]}")
  with open(os.path.join(out_dir, "knn.json")) as f:
    ours = json.load(f)

  # The official classifier on load_backbone features of the same file and the same eval views.
  from simdino_jax.backbone import load_backbone  # pylint: disable=import-outside-toplevel
  from simdino_jax.data import pipeline, sources  # pylint: disable=import-outside-toplevel

  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import demo  # pylint: disable=import-outside-toplevel

  config = demo.get_config()
  backbone = load_backbone(path, num_heads=HEADS)
  split_features = {}
  for split in ("train", "test"):
    source = sources.from_config(config.data, split, evaluation=True)
    feats, labels = [], []
    for batch in pipeline.eval_batches(source, image_size=config.data.global_size, batch_size=256):
      valid = batch["valid"]
      feats.append(np.asarray(backbone(batch["image"])["cls"])[valid])
      labels.append(batch["label"][valid])
    split_features[split] = (np.concatenate(feats), np.concatenate(labels))
  # The torch model itself on a few of the same views: the import is faithful.
  images = next(pipeline.eval_batches(source, image_size=config.data.global_size, batch_size=16))["image"]
  with torch.no_grad():
    reference = vit(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  feature_diff = float(np.max(np.abs(np.asarray(backbone(images)["cls"]) - reference)))

  knn_classifier = official_knn_classifier(dino)
  train = nn.functional.normalize(torch.from_numpy(split_features["train"][0]), dim=1, p=2)  # as eval_knn's main
  test = nn.functional.normalize(torch.from_numpy(split_features["test"][0]), dim=1, p=2)
  train_labels = torch.from_numpy(split_features["train"][1]).long()
  test_labels = torch.from_numpy(split_features["test"][1]).long()
  official = {}
  for k in ours["per_k"]:
    top1, top5 = knn_classifier(train, train_labels, test, test_labels, int(k), ours["temperature"], num_classes=10)
    official[k] = {"top1": top1, "top5": top5}
  print(json.dumps({"ours": ours, "official": official, "feature_diff": feature_diff, "pth": path}))


if __name__ == "__main__":
  main(*sys.argv[1:3])
