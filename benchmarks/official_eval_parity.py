r"""Parity with the official evaluation code: each evaluator's figure next to the official code's, on the SAME inputs.

  /path/to/torch-venv/bin/python benchmarks/official_eval_parity.py --official_dir /path/to/clones \
      [--check knn,dino_linear,...] [--seed 0] [--threads 2]

--official_dir holds the clones by name: dino/, dinov2/, CutLER/, msn/, revisitop/, davis2017-evaluation/ (and
ibot/ for the record). Needs a Python with PyTorch, simdino_jax, opencv-python-headless and scikit-image (the DAVIS
code's ``skimage.morphology.disk``), and cyanure (MSN's solver, ``pip install cyanure==1.2.2``); PyTorch is not a
dependency of the package. Nothing official is copied into the package: official functions are compiled from the
clones with ``ast`` (their files import torchvision, wandb, detectron2, ... at the top, so they are not imported),
and executed here. Prints ONE JSON line: {"checks": {name: {ours, official, max_abs_diff, ok, note, ...}}, "ok",
"official_commits", "seconds"}; the official code's own prints go to stderr.

Inputs (``--seed``): features of a seeded random tiny ViT of ours (patch 4, width 32, depth 2, 2 heads; float32,
matmul precision HIGHEST) on images this script makes: 10 classes, each a random 16 x 16 template plus noise (cls
tokens: 300 training / 200 test images); 32 x 32 frames of a moving square for DAVIS (patch tokens); a 48 x 48
image with two squares for MaskCut (the last block's keys, 12 x 12 grid); random arrays where the evaluator's input
is arrays (label maps, masks).

Checks (official side; "transcription" where the official code cannot run, quoted in the check's ``note``):
  knn           dino/eval_knn.py ``knn_classifier`` (features l2-normalised by ``nn.functional.normalize`` as its
                main) vs evals.knn.knn_accuracy_multi_k: top-1 / top-5 for k = 10, 20, 100, 200, T = 0.07.
  dino_linear   dino/eval_linear.py ``LinearClassifier``, ``train`` and ``validate_network`` (a stand-in backbone
                whose get_intermediate_layers returns the features) with its main's SGD(lr x batch / 256, momentum
                0.9, wd 0) and CosineAnnealingLR(epochs) stepped per epoch, vs evals.linear_dino.run with
                sgd_update; same initial weights (ours, copied), same batch order (ours), 6 epochs: per-epoch mean
                loss and top-1, final weights.
  dinov2_linear benchmarks/_eval_parity_dinov2_linear.py ``run(official_dir)`` (written separately), if present.
  fewshot       msn/logistic_eval.py's calls, on cyanure 1.2.2 (MSN used the 0.2x API, whose sdist no longer
                builds; 1.x is the same C++ solver behind ``cyanure.estimators.Classifier``):
                ``preprocess(X, normalize=True, columns=False, centering=True)`` then ``Classifier(loss=
                'multiclass-logistic', penalty='l2', fit_intercept=False, lambda_1=lambd / n, tol=1e-3,
                solver='auto', random_state=0, max_iter=300, duality_gap_interval=10)`` (MSN: ``lambd /=
                len(embs)``, ``it0=10``, ``max_epochs=300``, ``seed=0``) vs evals.fewshot on the same 5-shot split:
                preprocessed features, test accuracy, coefficients and the objective both minimise; the same
                problem is also solved tightly by cyanure (tol 1e-12, float64) to compare solutions, not tolerances.
  retrieval     dino/eval_image_retrieval.py's ranking (``sim = torch.mm(train_features, query_features.T); ranks =
                torch.argsort(-sim, dim=0)``, transcribed: it is inline in the script's main) and revisitop's
                ``compute_map`` (python/evaluate.py, imported; ``np.in1d`` -> ``np.isin``, gone in NumPy 2.4) with
                DINO's Medium / Hard ground truths, vs evals.retrieval: ranks, mAP and mP@1/5/10.
  davis         davis2017-evaluation's ``DAVISEvaluation(..., 'semi-supervised', 'val').evaluate`` on a DAVIS-layout
                folder this script writes (2 sequences, void pixels), global figures as evaluation_method.py, vs
                evals.davis.score_sequence / summarize; and dino/eval_video_segmentation.py's
                ``eval_video_tracking_davis`` (with label_propagation, restrict_neighborhood, norm_mask, read_seg)
                driven by a stand-in backbone returning our patch tokens, vs evals.davis.Propagator: soft labels and
                the written masks.
  maskcut       CutLER/maskcut/maskcut.py ``maskcut_forward`` (cpu=True) with TokenCut's ``detect_box`` and
                ``metric.IoU`` transcribed (third_party/TokenCut is a submodule the clone lacks) vs
                evals.maskcut.maskcut_patches, both solvers: each round's mask (official: its ``bipartitions``,
                ours upsampled minus earlier masks, CutLER's ``masked_out``) and eigenvector (up to sign).
  segmentation  mmseg 0.x ``intersect_and_union`` / ``total_area_to_metrics`` (mmseg/core/evaluation/metrics.py,
                transcribed with torch.histc as written: mmseg needs mmcv, which does not install here; iBOT's
                semantic segmentation evaluates with it) vs evals.segmentation.confusion / scores: mIoU, mAcc, aAcc
                and per-class IoU / Acc.

Patches (official code that cannot run as is on CPU; listed in each check's ``patches``): torch.Tensor.cuda ->
identity and torch.cuda.synchronize -> no-op while the official code runs; ``np.in1d`` -> ``np.isin``; DINO's
linear classifier is wrapped in a module exposing ``.module`` (what validate_network reads off its DDP wrapper).

Measured (seed 0, 2 shared CPU cores, torch 2.13.0+cpu, jax 0.10.2; official commits dino 7c446df, dinov2 b8931f7,
CutLER cca0a27, msn 4388dc1, revisitop be39832, davis2017-evaluation ac7c43f), every check ok in 59 s: k-NN, DAVIS
J&F, MaskCut masks (both solvers), mmseg's metric and revisitop's mAP equal (0 or 4e-15); DINO linear weights 1.8e-7
and losses 1.4e-7; DINOv2 linear 4.8e-7; few-shot accuracy equal, objective 3.6e-8 relative to cyanure solved
tightly; DAVIS soft labels 5.4e-7; DINO multi-scale descriptors 1.2e-7. The table: docs/evaluation.md, "Parity with
the official evaluation code".
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
import types
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# The commits of the official trees this harness was measured on (the extracted trees carry no .git).
KNOWN_COMMITS = {
  "dino": "7c446df",
  "dinov2": "b8931f7",
  "CutLER": "cca0a27",
  "msn": "4388dc1",
  "revisitop": "be39832",
  "davis2017-evaluation": "ac7c43f",
  "SimDINO": "8149fc4",
  "ibot": "da316d8",
}
# The clone each check reads (dinov2_linear: its helper module says).
NEEDS = {
  "knn": ("dino",),
  "dino_linear": ("dino",),
  "dinov2_linear": ("dinov2",),
  "fewshot": ("msn",),
  "retrieval": ("revisitop", "dino"),
  "davis": ("davis2017-evaluation", "dino"),
  "maskcut": ("CutLER",),
  "segmentation": (),
}
FLOAT_TOL = 1e-5  # float32 quantities computed in a different order on the two sides
PERCENT_TOL = 1e-9  # figures that are ratios of integer counts


def error(msg: str) -> None:
  print(f"official_eval_parity.py: error: {msg}", file=sys.stderr, flush=True)
  raise SystemExit(2)


def git_commit(repo: str) -> str:
  import subprocess  # pylint: disable=g-import-not-at-top

  try:
    return subprocess.run(
      ["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return KNOWN_COMMITS.get(os.path.basename(repo.rstrip("/")), "unknown") + " (as extracted)"


def _extract(path: str, names: tuple, namespace: dict) -> dict:
  """Compile the top-level definitions ``names`` of an official file alone (its imports never run)."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  nodes = [n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name in names]
  missing = set(names) - {n.name for n in nodes}
  if missing:
    raise RuntimeError(f"{path} defines no {sorted(missing)} (not the expected clone?)")
  exec(compile(ast.Module(body=nodes, type_ignores=[]), path, "exec"), namespace)  # pylint: disable=exec-used
  return namespace


def _load_module(name: str, path: str):
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@contextlib.contextmanager
def _cpu_patches():
  """torch.Tensor.cuda -> identity, torch.cuda.synchronize -> no-op, while official GPU code runs on CPU."""
  import torch  # pylint: disable=g-import-not-at-top

  cuda, sync = torch.Tensor.cuda, torch.cuda.synchronize
  torch.Tensor.cuda = lambda self, *a, **k: self
  torch.cuda.synchronize = lambda *a, **k: None
  try:
    yield
  finally:
    torch.Tensor.cuda, torch.cuda.synchronize = cuda, sync


def _max_abs(a, b) -> float:
  import numpy as np  # pylint: disable=g-import-not-at-top

  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    return float("inf")
  both_nan = np.isnan(a) & np.isnan(b)
  d = np.abs(np.where(both_nan, 0.0, a - b))
  return float(np.nanmax(np.where(np.isnan(d), np.inf, d))) if d.size else 0.0


def _row(ours, official, diff: float, tol: float, note: str, **extra) -> dict:
  return {"ours": ours, "official": official, "max_abs_diff": diff, "ok": bool(diff <= tol), "note": note, **extra}


# ---- shared inputs: a seeded random tiny ViT of ours on images made here ----------------------------------------
NUM_CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS, IMG = 10, 30, 20, 16


def _vit(seed: int, img_size: int):
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from simdino_jax.models.vit import VisionTransformer  # pylint: disable=g-import-not-at-top

  return VisionTransformer(patch_size=4, embed_dim=32, depth=2, num_heads=2, img_size=img_size, rngs=nnx.Rngs(seed))


def _apply(model, images, what: str):
  """``what`` ("cls", "patch" or "keys") of our ViT on images (B, H, W, 3), jitted, float32 NumPy."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, return_keys=what == "keys")[what])
  return np.array(fn(state, jax.numpy.asarray(images, jax.numpy.float32)), np.float32)  # writable (torch.from_numpy)


@functools.cache
def class_features(seed: int):
  """(train_x (300, 32), train_y, test_x (200, 32), test_y): cls tokens of 10 noisy class templates."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng([seed, 26])
  templates = rng.normal(size=(NUM_CLASSES, IMG, IMG, 3))

  def make(per):
    y = np.repeat(np.arange(NUM_CLASSES), per)
    x = templates[y] + 1.5 * rng.normal(size=(len(y), IMG, IMG, 3))
    return x.astype(np.float32), y.astype(np.int64)

  (tx, ty), (vx, vy) = make(TRAIN_PER_CLASS), make(TEST_PER_CLASS)
  model = _vit(seed, IMG)
  return np.array(_apply(model, tx, "cls")), ty, np.array(_apply(model, vx, "cls")), vy


# ---- knn ----------------------------------------------------------------------------------------------------
def check_knn(official_dir: str, seed: int) -> dict:
  import torch  # pylint: disable=g-import-not-at-top

  from simdino_jax.evals import knn  # pylint: disable=g-import-not-at-top

  ns = _extract(os.path.join(official_dir, "dino", "eval_knn.py"), ("knn_classifier",), {"torch": torch})
  train_x, train_y, test_x, test_y = class_features(seed)
  ks, temp = (10, 20, 100, 200), 0.07
  ours = knn.knn_accuracy_multi_k(train_x, train_y, test_x, test_y, num_classes=NUM_CLASSES, ks=ks, temperature=temp)
  # eval_knn.py's main: train_features = nn.functional.normalize(train_features, dim=1, p=2) (and the test ones).
  tf = torch.nn.functional.normalize(torch.from_numpy(train_x), dim=1, p=2)
  vf = torch.nn.functional.normalize(torch.from_numpy(test_x), dim=1, p=2)
  official = {}
  for k in ks:
    top1, top5 = ns["knn_classifier"](
      tf, torch.from_numpy(train_y), vf, torch.from_numpy(test_y), k, temp, num_classes=NUM_CLASSES
    )
    official[k] = {"top1": float(top1), "top5": float(top5)}
  diff = max(_max_abs([ours[k][m] for k in ks], [official[k][m] for k in ks]) for m in ("top1", "top5"))
  return _row(
    {str(k): ours[k] for k in ks},
    {str(k): official[k] for k in ks},
    diff,
    PERCENT_TOL,
    f"top-1 / top-5 (%) per k, T={temp}, {len(train_y)} train / {len(test_y)} test cls features, 10 classes; "
    "official: dino/eval_knn.py knn_classifier, run",
  )


# ---- DINO linear --------------------------------------------------------------------------------------------
def check_dino_linear(official_dir: str, seed: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  from simdino_jax.evals import linear_dino  # pylint: disable=g-import-not-at-top

  dino = os.path.join(official_dir, "dino")
  utils = _load_module("_dino_utils_eval_parity", os.path.join(dino, "utils.py"))
  ns = _extract(
    os.path.join(dino, "eval_linear.py"),
    ("LinearClassifier", "train", "validate_network"),
    {"torch": torch, "nn": nn, "utils": utils, "args": types.SimpleNamespace(arch="vit_tiny")},
  )
  train_x, train_y, test_x, test_y = class_features(seed)
  n, dim = len(train_y), train_x.shape[1]
  batch, epochs, base_lr = 64, 6, 1.0

  # OURS: linear_dino.run with a step on the features themselves (the backbone's forward is not under test).
  record = {"losses": [], "state": None}

  def step_fn(state, x, y, w, lrs):
    state, loss = linear_dino.sgd_update(state, x, y, w, lrs)
    record["losses"].append(float(loss[0]))
    record["state"] = state
    return state, loss

  def batches(epoch):
    order = linear_dino.epoch_order(seed, epoch, n)
    for lo in range(0, n, batch):
      idx = order[lo : lo + batch]
      x = np.zeros((batch, dim), np.float32)
      y = np.zeros((batch,), np.int32)
      w = np.zeros((batch,), np.float32)
      x[: len(idx)], y[: len(idx)], w[: len(idx)] = train_x[idx], train_y[idx], 1.0
      yield jax.numpy.asarray(x), jax.numpy.asarray(y), jax.numpy.asarray(w)

  init = linear_dino.init_classifiers(jax.random.key(seed), 1, dim, NUM_CLASSES)
  with contextlib.redirect_stdout(sys.stderr):
    result = linear_dino.run(
      step_fn=step_fn,
      batches_fn=batches,
      test_x=test_x,
      test_y=test_y,
      num_classes=NUM_CLASSES,
      dim=dim,
      lrs=(base_lr,),
      batch_size=batch,
      epochs=epochs,
      seed=seed,
      num_train=n,
      log=lambda m: print(m, file=sys.stderr),
    )
  steps = math.ceil(n / batch)
  ours_loss = [float(np.mean(record["losses"][e * steps : (e + 1) * steps])) for e in range(epochs)]
  ours_top1 = result["per_lr"][f"{base_lr:g}"]["top1_per_epoch"]
  ours_w = np.asarray(record["state"]["w"][0]).T
  ours_b = np.asarray(record["state"]["b"][0])

  # OFFICIAL: eval_linear.py's classes and loops, its main's optimiser and scheduler (quoted in the module doc).
  class Backbone:  # the frozen features themselves: get_intermediate_layers(inp, 1)[0][:, 0] is inp
    def get_intermediate_layers(self, inp, n):
      return [inp[:, None, :]]

  class DDPLike(nn.Module):
    def __init__(self, module):
      super().__init__()
      self.module = module

    def forward(self, x):
      return self.module(x)

  torch.manual_seed(seed)
  clf = ns["LinearClassifier"](dim, num_labels=NUM_CLASSES)
  with torch.no_grad():
    clf.linear.weight.copy_(torch.from_numpy(np.asarray(init["w"][0]).T.copy()))
    clf.linear.bias.copy_(torch.from_numpy(np.asarray(init["b"][0]).copy()))
  clf = DDPLike(clf)
  optimizer = torch.optim.SGD(
    clf.parameters(), base_lr * (batch * utils.get_world_size()) / 256.0, momentum=0.9, weight_decay=0
  )
  scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0)
  val = [
    (torch.from_numpy(test_x[i : i + batch]), torch.from_numpy(test_y[i : i + batch]))
    for i in range(0, len(test_y), batch)
  ]
  off_loss, off_top1, off_top5 = [], [], []
  with _cpu_patches(), contextlib.redirect_stdout(sys.stderr):
    for epoch in range(epochs):
      order = linear_dino.epoch_order(seed, epoch, n)
      loader = [
        (torch.from_numpy(train_x[order[lo : lo + batch]]), torch.from_numpy(train_y[order[lo : lo + batch]]))
        for lo in range(0, n, batch)
      ]
      stats = ns["train"](Backbone(), clf, optimizer, loader, epoch, 1, False)
      scheduler.step()
      test = ns["validate_network"](val, Backbone(), clf, 1, False)
      off_loss.append(float(stats["loss"]))
      off_top1.append(float(test["acc1"]))
      off_top5.append(float(test["acc5"]))
  off_w = clf.module.linear.weight.detach().numpy()
  off_b = clf.module.linear.bias.detach().numpy()
  loss_diff = _max_abs(ours_loss, off_loss)
  weight_diff = max(_max_abs(ours_w, off_w), _max_abs(ours_b, off_b))
  acc_diff = _max_abs(ours_top1, off_top1)
  row = _row(
    {"loss_per_epoch": ours_loss, "top1_per_epoch": ours_top1, "top1": result["accuracy"]},
    {"loss_per_epoch": off_loss, "top1_per_epoch": off_top1, "top1": max(off_top1)},
    max(loss_diff, weight_diff, acc_diff),
    FLOAT_TOL,
    f"{epochs} epochs, batch {batch}, base lr {base_lr} (x {batch}/256), momentum 0.9, cosine per epoch, same "
    "initial weights and batch order; max_abs_diff over per-epoch mean losses, final weights and per-epoch top-1 "
    "(%); official: dino/eval_linear.py LinearClassifier / train / validate_network, run",
    loss_diff=loss_diff,
    weight_diff=weight_diff,
    top1_diff=acc_diff,
    patches=["torch.Tensor.cuda -> identity", "classifier wrapped in a module exposing .module (DDP)"],
  )
  row["ok"] = bool(loss_diff <= FLOAT_TOL and weight_diff <= FLOAT_TOL and acc_diff <= PERCENT_TOL)
  return row


# ---- DINOv2 linear (a separate helper module) ----------------------------------------------------------------
def check_dinov2_linear(official_dir: str, seed: int) -> dict:
  path = os.path.join(ROOT, "benchmarks", "_eval_parity_dinov2_linear.py")
  if not os.path.isfile(path):
    return {"ours": None, "official": None, "max_abs_diff": None, "ok": None, "note": f"skipped: {path} is absent"}
  mod = _load_module("_eval_parity_dinov2_linear", path)
  with contextlib.redirect_stdout(sys.stderr):
    out = dict(mod.run(official_dir))
  for k in ("ours", "official", "max_abs_diff", "ok", "note"):
    out.setdefault(k, None)
  out["ok"] = None if out["ok"] is None else bool(out["ok"])
  return out


# ---- few-shot (MSN's logistic regression) ---------------------------------------------------------------------
def _logistic_objective(w, x, y, lambd_n: float) -> float:
  """cyanure's multiclass-logistic + l2 objective: mean_i [logsumexp(x_i W) - (x_i W)_{y_i}] + lambd_n / 2 ||W||^2."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from scipy.special import logsumexp  # pylint: disable=g-import-not-at-top

  z = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  return float(np.mean(logsumexp(z, axis=1) - z[np.arange(len(y)), y]) + 0.5 * lambd_n * np.sum(np.square(w)))


def check_fewshot(official_dir: str, seed: int) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top

  try:
    from cyanure.data_processing import preprocess as cy_preprocess  # pylint: disable=g-import-not-at-top
    from cyanure.estimators import Classifier  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return {
      "ours": None,
      "official": None,
      "max_abs_diff": None,
      "ok": False,
      "note": f"cyanure does not import ({e}): pip install cyanure==1.2.2 into this Python",
    }
  from simdino_jax.evals import fewshot  # pylint: disable=g-import-not-at-top

  train_x, train_y, test_x, test_y = class_features(seed)
  lambd, shots = 0.0025, 5
  idx = fewshot.split_indices(train_y, num_classes=NUM_CLASSES, shots=shots, seed=seed)
  x, y = train_x[idx], train_y[idx]

  # OFFICIAL (msn/logistic_eval.py): cyan.preprocess(embs, normalize=normalize, columns=False, centering=True) in
  # place on the float32 embeddings; lambd /= len(embs); classifier.fit(..., it0=10, lambd=lambd, lambd2=lambd,
  # nthreads=-1, tol=1e-3, solver='auto', seed=0, max_epochs=300); test_score = classifier.score(test_embs, labs).
  ox, otx = np.array(x, np.float32), np.array(test_x, np.float32)
  cy_preprocess(ox, normalize=True, columns=False, centering=True)
  cy_preprocess(otx, normalize=True, columns=False, centering=True)

  def cyanure_fit(tol: float, max_iter: int, feats):
    clf = Classifier(
      loss="multiclass-logistic",
      penalty="l2",
      fit_intercept=False,
      lambda_1=lambd / len(feats),
      lambda_2=lambd / len(feats),
      tol=tol,
      solver="auto",
      random_state=0,
      max_iter=max_iter,
      duality_gap_interval=10,
      n_threads=-1,
      verbose=False,
    )
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
      warnings.simplefilter("ignore")
      clf.fit(feats, y)
    return clf

  clf = cyanure_fit(1e-3, 300, ox)  # MSN's call, on float32 features as MSN's torch embeddings
  off_acc = 100.0 * float(clf.score(otx, test_y))
  off_w = np.asarray(clf.coef_, np.float64)  # (features, classes)
  # The same problem solved tightly: float64 features (in float32 cyanure's solver stalls at a relative objective
  # ~6e-7 above the optimum, at the precision of its float32 arithmetic).
  ox64 = np.array(x, np.float64)
  cy_preprocess(ox64, normalize=True, columns=False, centering=True)
  tight = cyanure_fit(1e-12, 100000, ox64)
  tight_w = np.asarray(tight.coef_, np.float64)
  otx64 = np.array(test_x, np.float64)
  cy_preprocess(otx64, normalize=True, columns=False, centering=True)
  tight_acc = 100.0 * float(tight.score(otx64, test_y))

  # OURS: the module's preprocessing and solver (fewshot.logistic_fit_accuracy) on the same split.
  px, ptx = fewshot.preprocess(x), fewshot.preprocess(test_x)
  prep_diff = max(_max_abs(px, ox), _max_abs(ptx, otx))
  fit = fewshot.logistic_fit_accuracy(x, y, test_x, test_y, lambd=lambd)
  ours_acc = fit["accuracy"]
  ours_w = np.asarray(fit["model"].coef_, np.float64).T
  lambd_n = lambd / len(ox)
  obj_ours, obj_off = _logistic_objective(ours_w, ox, y, lambd_n), _logistic_objective(off_w, ox, y, lambd_n)
  obj_tight = _logistic_objective(tight_w, ox64, y, lambd_n)
  coef_rel = float(np.linalg.norm(ours_w - off_w) / np.linalg.norm(off_w))
  coef_rel_tight = float(np.linalg.norm(ours_w - tight_w) / np.linalg.norm(tight_w))
  # Strong convexity (modulus lambd / n) bounds the distance to the minimiser by the objective's excess:
  # ||w - w*|| <= sqrt(2 (f(w) - f*) / mu); f* taken as the tight cyanure solution's value. The bound is nearly
  # attained: along W + v 1^T (softmax's invariance) the curvature is exactly mu, so the check allows 1.5x for the
  # tight solution's own error in f*.
  coef_bound = math.sqrt(2.0 * max(obj_ours - obj_tight, 1e-15 * abs(obj_tight)) / lambd_n)
  coef_dist = float(np.linalg.norm(ours_w - tight_w))
  obj_rel = abs(obj_ours - obj_off) / abs(obj_off)
  obj_rel_tight = abs(obj_ours - obj_tight) / abs(obj_tight)
  row = _row(
    {"accuracy": ours_acc, "objective": obj_ours},
    {
      "accuracy": off_acc,
      "objective": obj_off,
      "accuracy_float64_tol_1e-12": tight_acc,
      "objective_float64_tol_1e-12": obj_tight,
    },
    abs(ours_acc - tight_acc),
    PERCENT_TOL,
    f"{shots}-shot split (seed {seed}) of 10 classes, lambd {lambd} (MSN README's --lambd); objective mean "
    "cross-entropy + lambd/n /2 ||W||^2 evaluated in float64 on the official preprocessed features; official: "
    "cyanure 1.2.2 with msn/logistic_eval.py's parameters (tol 1e-3, float32), run (the 0.2x API MSN calls no "
    "longer installs), and the same problem solved tightly (tol 1e-12, float64 features), whose test accuracy "
    "max_abs_diff compares",
    preprocess_diff=prep_diff,
    coef_rel_diff=coef_rel,
    coef_rel_diff_float64_tol_1e12=coef_rel_tight,
    coef_distance=coef_dist,
    coef_distance_bound=coef_bound,
    objective_rel_diff=obj_rel,
    objective_rel_diff_float64_tol_1e12=obj_rel_tight,
    ours_duality_gap=fit.get("duality_gap"),
  )
  # Both solve one strictly convex problem to a tolerance (cyanure at MSN's call: relative duality gap 1e-3, in
  # float32): against that solution the objective agrees to its tolerance and a test prediction near a decision
  # boundary may flip (accuracy_diff_msn_tol, reported); against the tightly solved problem the predictions agree
  # and the coefficients lie within the distance strong convexity allows for our objective's excess.
  row["accuracy_diff_msn_tol"] = abs(ours_acc - off_acc)
  row["ok"] = bool(
    abs(ours_acc - tight_acc) <= PERCENT_TOL
    and prep_diff <= FLOAT_TOL
    and obj_rel <= 1e-3
    and obj_rel_tight <= 1e-6
    and coef_dist <= 1.5 * coef_bound
  )
  return row


# ---- retrieval ----------------------------------------------------------------------------------------------
def check_retrieval(official_dir: str, seed: int) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  from simdino_jax.evals import retrieval  # pylint: disable=g-import-not-at-top

  patches = []
  if not hasattr(np, "in1d"):
    np.in1d = lambda a, b: np.isin(np.asarray(a).ravel(), b)  # removed in NumPy 2.4; compute_map calls it
    patches.append("np.in1d -> np.isin (NumPy 2.4 removed in1d)")
  rev = _load_module("_revisitop_evaluate", os.path.join(official_dir, "revisitop", "python", "evaluate.py"))
  train_x, train_y, test_x, test_y = class_features(seed)
  rng = np.random.default_rng([seed, 7])
  db_idx = rng.choice(len(train_y), 80, replace=False)
  q_idx = rng.choice(len(test_y), 12, replace=False)
  db, db_y, q, q_y = train_x[db_idx], train_y[db_idx], test_x[q_idx], test_y[q_idx]
  gnd = []
  for i in range(len(q)):  # the revisited layout: same-class images split at random into easy / hard / junk
    same = rng.permutation(np.flatnonzero(db_y == q_y[i]))
    cut = rng.integers(0, len(same) + 1, size=2)
    a, b = sorted(cut)
    if i == 0:
      a, b = len(same), len(same)  # a query with easy positives only: no hard positive, left out of Hard
    gnd.append({"easy": same[:a], "hard": same[a:b], "junk": same[b:]})

  # OFFICIAL ranking (dino/eval_image_retrieval.py, inline in its main, transcribed):
  #   train_features = nn.functional.normalize(train_features, dim=1, p=2); (query_features alike)
  #   sim = torch.mm(train_features, query_features.T); ranks = torch.argsort(-sim, dim=0).cpu().numpy()
  tf = torch.nn.functional.normalize(torch.from_numpy(db), dim=1, p=2)
  qf = torch.nn.functional.normalize(torch.from_numpy(q), dim=1, p=2)
  ranks = torch.argsort(-torch.mm(tf, qf.T), dim=0).cpu().numpy()
  orders = retrieval.rank_database(db, q)
  # Ranks may differ only where two database images are tied to float32 rounding (the official ranks on float32
  # cosines, ours on float64): the largest float64 similarity gap between the images the two sides put at a rank.
  unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
  sim64 = unit(q.astype(np.float64)) @ unit(db.astype(np.float64)).T
  swapped = np.argwhere(orders != ranks.T)
  swap_gap = max([abs(sim64[i, orders[i, r]] - sim64[i, ranks[r, i]]) for i, r in swapped.tolist()] + [0.0])
  ks = [1, 5, 10]
  ours, official = {}, {}
  for name in ("medium", "hard"):
    # eval_image_retrieval.py: Medium ok = easy + hard, junk = junk; Hard ok = hard, junk = junk + easy.
    if name == "medium":
      gnd_t = [{"ok": np.concatenate([g["easy"], g["hard"]]), "junk": np.concatenate([g["junk"]])} for g in gnd]
    else:
      gnd_t = [{"ok": np.concatenate([g["hard"]]), "junk": np.concatenate([g["junk"], g["easy"]])} for g in gnd]
    m, aps, mpr, _ = rev.compute_map(ranks, gnd_t, ks)
    om, oaps, ompr, _ = retrieval.compute_map(orders, retrieval.protocol_gnd(gnd, name), kappas=tuple(ks))
    official[name] = {"map": 100 * float(m), "mp@k": [100 * float(v) for v in mpr], "aps": [float(v) for v in aps]}
    ours[name] = {"map": 100 * float(om), "mp@k": [100 * float(v) for v in ompr], "aps": [float(v) for v in oaps]}
  diff = max(
    max(_max_abs(ours[p]["aps"], official[p]["aps"]), _max_abs(ours[p]["mp@k"], official[p]["mp@k"])) for p in ours
  )
  diff = max(diff, _max_abs([ours[p]["map"] for p in ours], [official[p]["map"] for p in ours]))
  for p in ours:  # the per-query APs stay in the diff, not in the table
    ours[p].pop("aps")
    official[p].pop("aps")
  row = _row(
    ours,
    official,
    diff,
    1e-9,
    f"{len(q)} queries x {len(db)} database cls features, easy / hard / junk drawn among same-class images (query "
    "0 without hard positives); mAP and mP@1/5/10 (%), per-query APs in the diff; official: revisitop "
    "compute_map, run, and eval_image_retrieval.py's ranking, transcribed (inline in its main)",
    ranks_differing=len(swapped),
    max_swap_similarity_gap=float(swap_gap),
    patches=patches,
  )
  row["multiscale"] = _multiscale_descriptors(official_dir, seed)
  row["ok"] = bool(row["ok"] and swap_gap <= 1e-6 and row["multiscale"]["descriptor_diff"] <= FLOAT_TOL)
  return row


def _multiscale_descriptors(official_dir: str, seed: int) -> dict:
  """DINO's ``utils.multi_scale`` (run, on the official ViT loaded with our weights) vs our
  ``retrieval.make_descriptor_fn(multiscale=True)`` on the same non-square images."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from simdino_jax.evals import retrieval  # pylint: disable=g-import-not-at-top
  from simdino_jax.io import torch_interop  # pylint: disable=g-import-not-at-top
  from simdino_jax.tree import named_leaves  # pylint: disable=g-import-not-at-top

  dino = os.path.join(official_dir, "dino")
  sys.path.insert(0, dino)  # vision_transformer.py does `from utils import trunc_normal_`
  try:
    saved = sys.modules.pop("utils", None)
    vits = _load_module("_dino_vits_eval_parity", os.path.join(dino, "vision_transformer.py"))
    utils = sys.modules["utils"]
  finally:
    sys.path.remove(dino)
    sys.modules.pop("utils", None)
    if saved is not None:
      sys.modules["utils"] = saved
  model = _vit(seed, IMG)
  graphdef, state = nnx.split(model)
  official = vits.VisionTransformer(  # as vits.vit_tiny builds it (LayerNorm eps 1e-6), at our tiny sizes
    img_size=[IMG],
    patch_size=4,
    embed_dim=32,
    depth=2,
    num_heads=2,
    mlp_ratio=4,
    qkv_bias=True,
    norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
  )
  sd = torch_interop.to_torch({k: np.asarray(v) for k, v in named_leaves(state).items()}, flavor="dino")
  official.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
  official.eval()
  rng = np.random.default_rng([seed, 11])
  images = rng.normal(size=(6, 26, 21, 3)).astype(np.float32)  # 26 x 21: scales 1/sqrt(2), 1/2 crop partial patches
  ours = np.asarray(jax.jit(retrieval.make_descriptor_fn(graphdef, patch=4, multiscale=True))(state, images))
  with torch.no_grad():
    theirs = np.concatenate(  # eval_image_retrieval.py calls multi_scale one image at a time (batch 1)
      [utils.multi_scale(torch.from_numpy(im.transpose(2, 0, 1)[None].copy()), official).numpy() for im in images]
    )
  return {"descriptor_diff": _max_abs(ours, theirs), "images": "6 x (26 x 21)"}


# ---- DAVIS --------------------------------------------------------------------------------------------------
def _write_indexed(path: str, ids) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from simdino_jax.evals import davis  # pylint: disable=g-import-not-at-top

  im = Image.fromarray(np.asarray(ids, np.uint8), mode="P")
  im.putpalette(davis.palette().reshape(-1).tolist())
  im.save(path)


def _moving_squares(rng, t_len: int, h: int, w: int, num_objects: int):
  """(T, H, W) uint8 label maps of ``num_objects`` squares moving by a few pixels a frame."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  maps = np.zeros((t_len, h, w), np.uint8)
  pos = rng.integers(2, min(h, w) // 2, size=(num_objects, 2)).astype(np.float64)
  vel = rng.normal(scale=1.5, size=(num_objects, 2))
  size = rng.integers(min(h, w) // 5, min(h, w) // 3, size=num_objects)
  for t in range(t_len):
    for o in range(num_objects):
      y0, x0 = np.clip((pos[o] + t * vel[o]).astype(int), 0, [h - size[o], w - size[o]])
      maps[t, y0 : y0 + size[o], x0 : x0 + size[o]] = o + 1
  return maps


def _davis_scores(official_dir: str, seed: int, work: str) -> dict:
  """J&F of made-up predictions: DAVISEvaluation (run) vs score_sequence / summarize."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from simdino_jax.evals import davis  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng([seed, 17])
  root, res = os.path.join(work, "DAVIS"), os.path.join(work, "results")
  os.makedirs(os.path.join(root, "ImageSets", "2017"), exist_ok=True)
  seqs = {"seq-a": (12, 40, 56, 2), "seq-b": (9, 48, 36, 3)}
  per_object = {}
  for name, (t_len, h, w, n_obj) in seqs.items():
    gt = _moving_squares(rng, t_len, h, w, n_obj)
    gt[:, :2, :] = np.where(gt[:, :2, :] == 0, 255, gt[:, :2, :])  # a void band (255) at the top
    pred = gt.copy()
    pred[pred == 255] = 0
    jitter = rng.random((t_len, h, w)) < 0.05  # noisy predictions: 5% of pixels relabelled at random
    pred[jitter] = rng.integers(0, n_obj + 1, size=int(jitter.sum()))
    pred[3] = np.roll(pred[3], 4, axis=1)  # one frame badly shifted
    for d in ("JPEGImages", "Annotations"):
      os.makedirs(os.path.join(root, d, "480p", name), exist_ok=True)
    os.makedirs(os.path.join(res, name), exist_ok=True)
    for t in range(t_len):
      Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(
        os.path.join(root, "JPEGImages", "480p", name, f"{t:05d}.jpg")
      )
      _write_indexed(os.path.join(root, "Annotations", "480p", name, f"{t:05d}.png"), gt[t])
      _write_indexed(os.path.join(res, name, f"{t:05d}.png"), pred[t])
    for obj, s in davis.score_sequence(gt, pred, n_obj).items():
      per_object[(name, obj)] = s
  with open(os.path.join(root, "ImageSets", "2017", "val.txt"), "w") as f:
    f.write("\n".join(seqs) + "\n")
  ours = davis.summarize(per_object)

  sys.path.insert(0, os.path.join(official_dir, "davis2017-evaluation"))
  try:
    from davis2017.evaluation import DAVISEvaluation  # pylint: disable=g-import-not-at-top,import-error
  finally:
    sys.path.pop(0)
  with contextlib.redirect_stdout(sys.stderr):
    m = DAVISEvaluation(davis_root=root, task="semi-supervised", gt_set="val").evaluate(res)
  j, f = m["J"], m["F"]
  # evaluation_method.py: final_mean = (np.mean(J["M"]) + np.mean(F["M"])) / 2., then J-Mean, J-Recall, J-Decay, ...
  official = {
    "jf_mean": 100 * (np.mean(j["M"]) + np.mean(f["M"])) / 2.0,
    "j_mean": 100 * np.mean(j["M"]),
    "j_recall": 100 * np.mean(j["R"]),
    "j_decay": 100 * np.mean(j["D"]),
    "f_mean": 100 * np.mean(f["M"]),
    "f_recall": 100 * np.mean(f["R"]),
    "f_decay": 100 * np.mean(f["D"]),
  }
  official = {k: float(v) for k, v in official.items()}
  return {"ours": ours, "official": official, "diff": _max_abs(list(ours.values()), [official[k] for k in ours])}


def _davis_propagation(official_dir: str, seed: int, work: str) -> dict:
  """dino/eval_video_segmentation.py's eval_video_tracking_davis on our patch tokens vs our Propagator."""
  import cv2  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  from torch.nn import functional as F  # pylint: disable=g-import-not-at-top

  from simdino_jax.evals import davis  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng([seed, 23])
  t_len, size, grid = 10, 32, 8
  labels = _moving_squares(rng, t_len, size, size, 2)
  colours = np.array([[0.1, 0.1, 0.1], [0.9, 0.2, 0.2], [0.2, 0.3, 0.9]])
  frames = colours[labels] + 0.3 * rng.normal(size=(t_len, size, size, 3))
  tokens = _apply(_vit(seed, size), frames, "patch")  # (T, 64, 32)
  video = os.path.join(work, "video")
  os.makedirs(video, exist_ok=True)
  for t in range(t_len):
    Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(os.path.join(video, f"{t:05d}.jpg"))
  _write_indexed(os.path.join(work, "first.png"), labels[0])
  # The official script reads a square frame at 480 x 448 (read_frame: th = 480, tw = 480 floored to a multiple of
  # 64): a stand-in patch size of 56 puts our 8 x 8 token grid on it (int(480 / 56) = 448 / 56 = 8, as its
  # extract_feature computes h, w), and read_seg's annotation grid is (480 // 56, 448 // 56) = 8 x 8 too. The
  # backbone returns our tokens of the frame it is called for, in order.
  fake_patch = 56
  args = types.SimpleNamespace(
    output_dir=os.path.join(work, "out"), n_last_frames=7, size_mask_neighborhood=2, topk=5, patch_size=fake_patch
  )

  class Backbone:
    patch_embed = types.SimpleNamespace(patch_size=fake_patch)
    calls = 0

    def get_intermediate_layers(self, x, n=1):
      t = Backbone.calls
      Backbone.calls += 1
      tok = torch.from_numpy(tokens[t])[None]
      return [torch.cat([torch.zeros(1, 1, tok.shape[-1]), tok], dim=1)]  # a cls slot, discarded by the script

  import copy as copy_mod  # pylint: disable=g-import-not-at-top
  import glob as glob_mod  # pylint: disable=g-import-not-at-top
  import queue as queue_mod  # pylint: disable=g-import-not-at-top

  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  ns = {
    "np": np,
    "torch": torch,
    "nn": nn,
    "F": F,
    "cv2": cv2,
    "Image": Image,
    "os": os,
    "glob": glob_mod,
    "copy": copy_mod,
    "queue": queue_mod,
    "tqdm": lambda it, **k: it,
    "args": args,
  }
  del tqdm
  _extract(
    os.path.join(official_dir, "dino", "eval_video_segmentation.py"),
    (
      "eval_video_tracking_davis",
      "restrict_neighborhood",
      "norm_mask",
      "label_propagation",
      "extract_feature",
      "imwrite_indexed",
      "to_one_hot",
      "read_frame_list",
      "read_frame",
      "read_seg",
      "color_normalize",
    ),
    ns,
  )
  soft_official = []
  propagate = ns["label_propagation"]

  def recording(*a, **k):
    out = propagate(*a, **k)
    soft_official.append(out[0][0].detach().numpy().reshape(out[0].shape[1], -1).T.copy())  # (hw, C)
    return out

  ns["label_propagation"] = recording
  with _cpu_patches(), contextlib.redirect_stdout(sys.stderr):
    first_seg, seg_ori = ns["read_seg"](os.path.join(work, "first.png"), fake_patch)
    ns["eval_video_tracking_davis"](
      args, Backbone(), ns["read_frame_list"](video), video, first_seg, seg_ori, davis.palette()
    )
  official = np.stack(
    [np.array(Image.open(os.path.join(args.output_dir, "video", f"{t:05d}.png"))) for t in range(1, t_len)]
  )

  channels = int(labels[0].max()) + 1
  prop = davis.Propagator(
    tokens[0],
    davis.first_frame_labels(labels[0], grid, grid, channels),
    grid_h=grid,
    grid_w=grid,
    patch=fake_patch,
    n_last_frames=7,
    temperature=0.1,
    topk=5,
    radius=2,
  )
  soft_ours, ours = [], []
  for t in range(1, t_len):
    seg, ids = prop.step(tokens[t])
    soft_ours.append(np.asarray(seg))
    ids = np.asarray(ids).astype(np.uint8)
    ours.append(np.array(Image.fromarray(ids).resize((size, size), Image.NEAREST)))  # as DavisEvaluator.run
  ours = np.stack(ours)
  first_diff = _max_abs(
    first_seg[0].numpy().reshape(channels, -1).T, davis.first_frame_labels(labels[0], grid, grid, channels)
  )
  return {
    "soft_diff": _max_abs(np.stack(soft_ours), np.stack(soft_official)),
    "first_seg_diff": first_diff,
    "pixels_differing": int(np.sum(ours != official)),
    "pixels": int(ours.size),
    "ours_j": float(np.mean(davis.region_j(labels[1:] > 0, ours > 0))),
    "official_j": float(np.mean(davis.region_j(labels[1:] > 0, official > 0))),
  }


def check_davis(official_dir: str, seed: int) -> dict:
  with tempfile.TemporaryDirectory() as work:
    scores = _davis_scores(official_dir, seed, work)
    prop = _davis_propagation(official_dir, seed, work)
  row = _row(
    scores["ours"],
    scores["official"],
    scores["diff"],
    1e-9,
    "J&F on 2 made-up sequences (2 and 3 objects, a void band, 5% noisy pixels, one shifted frame): "
    "davis2017-evaluation DAVISEvaluation.evaluate, run; propagation: dino/eval_video_segmentation.py "
    "eval_video_tracking_davis (10 frames, 8 x 8 tokens, window 2, top-5, 7 previous frames), run",
    propagation=prop,
    patches=["torch.Tensor.cuda -> identity (restrict_neighborhood, label_propagation)", "tqdm -> identity"],
  )
  row["ok"] = bool(
    row["ok"] and prop["soft_diff"] <= FLOAT_TOL and prop["pixels_differing"] == 0 and prop["first_seg_diff"] == 0
  )
  return row


# ---- MaskCut ------------------------------------------------------------------------------------------------
def _tokencut(torch):
  """TokenCut's ``detect_box`` (unsupervised_saliency_detection/object_discovery.py) and ``metric.IoU``
  (unsupervised_saliency_detection/metric.py), transcribed: CutLER imports them from its third_party/TokenCut
  submodule, which the extracted clone does not hold."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from scipy import ndimage  # pylint: disable=g-import-not-at-top

  def detect_box(bipartition, seed, dims, initial_im_size=None, scales=None, principle_object=True):
    objects, _ = ndimage.label(bipartition)
    cc = objects[np.unravel_index(seed, dims)]
    mask = np.where(objects == cc)
    ymin, ymax = min(mask[0]), max(mask[0]) + 1
    xmin, xmax = min(mask[1]), max(mask[1]) + 1
    pred = [scales[1] * xmin, scales[0] * ymin, scales[1] * xmax, scales[0] * ymax]
    if initial_im_size:
      pred[2] = min(pred[2], initial_im_size[1])
      pred[3] = min(pred[3], initial_im_size[0])
    return pred, [ymin, xmin, ymax, xmax], objects, mask

  def iou(mask1, mask2):
    mask1, mask2 = (mask1 > 0.5).to(torch.bool), (mask2 > 0.5).to(torch.bool)
    intersection = torch.sum(mask1 * (mask1 == mask2), dim=[-1, -2]).squeeze()
    union = torch.sum(mask1 + mask2, dim=[-1, -2]).squeeze()
    return (intersection.to(torch.float) / union).mean().item()

  return detect_box, types.SimpleNamespace(IoU=iou)


def check_maskcut(official_dir: str, seed: int) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  import scipy.linalg  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from torch.nn import functional as F  # pylint: disable=g-import-not-at-top

  from simdino_jax.evals import maskcut  # pylint: disable=g-import-not-at-top

  detect_box, metric = _tokencut(torch)
  ns = _extract(
    os.path.join(official_dir, "CutLER", "maskcut", "maskcut.py"),
    (
      "get_affinity_matrix",
      "second_smallest_eigenvector",
      "get_salient_areas",
      "check_num_fg_corners",
      "get_masked_affinity_matrix",
      "maskcut_forward",
    ),
    {"np": np, "torch": torch, "F": F, "eigh": scipy.linalg.eigh, "detect_box": detect_box, "metric": metric},
  )
  rng = np.random.default_rng([seed, 31])
  size, patch, grid, num_masks, tau = 48, 4, 12, 3, 0.2
  img = 0.2 * rng.normal(size=(size, size, 3))
  img[8:28, 6:26] += np.array([2.0, -1.0, 0.5])  # two "objects" on a noisy background
  img[30:44, 28:44] += np.array([-1.5, 1.5, 1.0])
  keys = _apply(_vit(seed, size), img[None], "keys")[0]  # (144, 32)
  with contextlib.redirect_stdout(sys.stderr):
    _, bip, eig = ns["maskcut_forward"](
      torch.from_numpy(keys.T.copy()), [grid, grid], [patch, patch], [size, size], tau, N=num_masks, cpu=True
    )
  official = [np.asarray(b) > 0 for b in bip]  # (48, 48) per round, earlier rounds' pixels removed (masked_out)
  off_vec = [np.asarray(e)[::patch, ::patch].reshape(-1) for e in eig]  # nearest-upsampled second eigenvectors

  rows = {}
  for solver in maskcut.SOLVERS:
    rounds = maskcut.maskcut_patches(keys, (grid, grid), tau=tau, num_masks=num_masks, solver=solver)
    taken = np.zeros((size, size), bool)
    ours, vec_diff, painted = [], 0.0, np.zeros(grid * grid, bool)
    for i, r in enumerate(rounds):
      up = np.repeat(np.repeat(r["mask"], patch, axis=0), patch, axis=1) & ~taken  # CutLER's masked_out
      taken |= up
      ours.append(up)
      # The same round's eigenvector from our pieces (maskcut_patches' own painting), compared up to sign.
      a = maskcut.affinity(np.where(painted[:, None], 0.0, keys.astype(np.float64)), tau)
      v = maskcut.second_eigenvector(a, solver)
      vec_diff = max(vec_diff, min(_max_abs(v, off_vec[i]), _max_abs(-v, off_vec[i])))
      painted |= r["mask"].reshape(-1)
    differing = [int(np.sum(o != f)) for o, f in zip(ours, official)]
    rows[solver] = {
      "pixels_differing_per_round": differing,
      "mask_pixels_per_round": [int(o.sum()) for o in ours],
      "official_mask_pixels_per_round": [int(f.sum()) for f in official],
      "eigenvector_diff_up_to_sign": vec_diff,
      "ok": bool(sum(differing) == 0 and vec_diff <= 1e-4),
    }
  diff = float(max(sum(r["pixels_differing_per_round"]) for r in rows.values()))
  return {
    "ours": {s: r["mask_pixels_per_round"] for s, r in rows.items()},
    "official": rows["scipy"]["official_mask_pixels_per_round"],
    "max_abs_diff": diff,
    "ok": all(r["ok"] for r in rows.values()),
    "note": f"{num_masks} rounds on the keys of a 48 x 48 image (12 x 12 patches, tau {tau}); max_abs_diff: pixels "
    "whose mask differs (worst solver); eigenvectors from the float64 SciPy solve (official) vs each of our "
    "solvers (jax: float64 with LAPACK's sign), up to sign; official: CutLER maskcut_forward, run, TokenCut detect_box / IoU "
    "transcribed",
    "per_solver": rows,
  }


# ---- segmentation metric (mmseg) ------------------------------------------------------------------------------
def _mmseg_mean_iou(results, gt_seg_maps, num_classes: int, ignore_index: int = 255) -> dict:
  """mmseg 0.x ``total_intersect_and_union`` + ``total_area_to_metrics(metrics=['mIoU'])`` transcribed (mmseg/core/
  evaluation/metrics.py):
      mask = (label != ignore_index); pred_label = pred_label[mask]; label = label[mask]
      intersect = pred_label[pred_label == label]
      area_intersect = torch.histc(intersect.float(), bins=(num_classes), min=0, max=num_classes - 1)
      area_pred_label = torch.histc(pred_label.float(), ...); area_label = torch.histc(label.float(), ...)
      area_union = area_pred_label + area_label - area_intersect
      all_acc = total_area_intersect.sum() / total_area_label.sum()
      iou = total_area_intersect / total_area_union; acc = total_area_intersect / total_area_label
  and the summary of mmseg's CustomDataset.evaluate: np.nanmean(value) * 100 (rounded to 2 decimals there)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  tot = [torch.zeros((num_classes,), dtype=torch.float64) for _ in range(4)]
  for pred_label, label in zip(results, gt_seg_maps):
    pred_label, label = torch.from_numpy(pred_label), torch.from_numpy(label)
    mask = label != ignore_index
    pred_label, label = pred_label[mask], label[mask]
    intersect = pred_label[pred_label == label]
    ai = torch.histc(intersect.float(), bins=(num_classes), min=0, max=num_classes - 1)
    ap = torch.histc(pred_label.float(), bins=(num_classes), min=0, max=num_classes - 1)
    al = torch.histc(label.float(), bins=(num_classes), min=0, max=num_classes - 1)
    for acc, v in zip(tot, (ai, ap + al - ai, ap, al)):
      acc += v
  inter, union, _, label_area = tot
  iou, acc = (inter / union).numpy(), (inter / label_area).numpy()
  return {
    "miou": float(np.nanmean(iou) * 100),
    "macc": float(np.nanmean(acc) * 100),
    "aacc": float((inter.sum() / label_area.sum()).item() * 100),
    "iou": iou * 100,
    "acc": acc * 100,
  }


def check_segmentation(official_dir: str, seed: int) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top

  from simdino_jax.evals import segmentation  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng([seed, 41])
  c = 7
  gts, preds = [], []
  for _ in range(4):
    gt = rng.integers(0, c - 2, size=(37, 53))  # classes 5 and 6 never in the ground truth
    gt[rng.random(gt.shape) < 0.1] = 255  # ignored pixels
    pred = np.where(rng.random(gt.shape) < 0.6, np.where(gt == 255, 0, gt), rng.integers(0, c - 1, size=gt.shape))
    gts.append(gt.astype(np.int64))
    preds.append(pred.astype(np.int64))  # class 5 predicted (IoU 0, Acc NaN); class 6 nowhere (both NaN)
  conf = sum(segmentation.confusion(g, p, c) for g, p in zip(gts, preds))
  ours = segmentation.scores(conf)
  off = _mmseg_mean_iou(preds, gts, c)
  diff = max(
    _max_abs([ours[k] for k in ("miou", "macc", "aacc")], [off[k] for k in ("miou", "macc", "aacc")]),
    _max_abs(ours["iou"], off["iou"]),
    _max_abs(ours["acc"], off["acc"]),
  )
  nan_agree = bool(
    np.array_equal(np.isnan(ours["iou"]), np.isnan(off["iou"]))
    and np.array_equal(np.isnan(ours["acc"]), np.isnan(off["acc"]))
  )
  row = _row(
    {k: ours[k] for k in ("miou", "macc", "aacc")},
    {k: off[k] for k in ("miou", "macc", "aacc")},
    diff,
    1e-9,
    "4 random 37 x 53 label maps, 7 classes (10% ignored pixels; class 5 predicted but absent from the ground "
    "truth, class 6 nowhere); per-class IoU / Acc in the diff; official: mmseg 0.x mean_iou, TRANSCRIBED "
    "(torch.histc as written; mmseg needs mmcv, which does not install here)",
    nan_classes_agree=nan_agree,
  )
  row["ok"] = bool(row["ok"] and nan_agree)
  return row


CHECKS = {
  "knn": check_knn,
  "dino_linear": check_dino_linear,
  "dinov2_linear": check_dinov2_linear,
  "fewshot": check_fewshot,
  "retrieval": check_retrieval,
  "davis": check_davis,
  "maskcut": check_maskcut,
  "segmentation": check_segmentation,
}


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    "--official_dir",
    default=None,
    help="folder holding the official clones by name: dino/, dinov2/, CutLER/, msn/, revisitop/, davis2017-evaluation/",
  )
  parser.add_argument("--check", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (torch.set_num_threads)")
  args = parser.parse_args(argv)
  if not args.official_dir:
    error("--official_dir is required: a folder holding the official clones (dino/, dinov2/, CutLER/, msn/, ...)")
  if not os.path.isdir(args.official_dir):
    error(f"--official_dir={args.official_dir}: no such directory")
  names = [c.strip() for c in args.check.split(",") if c.strip()]
  unknown = sorted(set(names) - set(CHECKS))
  if unknown or not names:
    error(f"--check: unknown check(s) {unknown or names}; choose from {','.join(CHECKS)}")
  missing = {n: [c for c in NEEDS[n] if not os.path.isdir(os.path.join(args.official_dir, c))] for n in names}
  missing = {n: m for n, m in missing.items() if m}
  if missing:
    n, m = next(iter(missing.items()))
    error(f"--official_dir={args.official_dir}: check {n} needs the clone(s) {', '.join(m)}/ (not found)")

  start = time.time()
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_default_matmul_precision", "highest")
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(args.threads)
  checks = {}
  for name in names:
    t0 = time.time()
    try:
      checks[name] = CHECKS[name](args.official_dir, args.seed)
    except Exception as e:  # noqa: BLE001  (one failing check must not hide the others' figures)
      checks[name] = {
        "ours": None,
        "official": None,
        "max_abs_diff": None,
        "ok": False,
        "note": f"error: {type(e).__name__}: {e}",
      }
    checks[name]["seconds"] = round(time.time() - t0, 1)
    print(f"official_eval_parity.py: {name}: ok={checks[name]['ok']} ({checks[name]['seconds']} s)", file=sys.stderr)
  clones = sorted({c for n in names for c in NEEDS[n]})
  out = {
    "checks": checks,
    "ok": all(r["ok"] is not False for r in checks.values()),
    "seed": args.seed,
    "official_dir": args.official_dir,
    "official_commits": {c: git_commit(os.path.join(args.official_dir, c)) for c in clones},
    "seconds": round(time.time() - start, 1),
  }
  print(json.dumps(out, default=float), flush=True)
  return out


if __name__ == "__main__":
  main()
