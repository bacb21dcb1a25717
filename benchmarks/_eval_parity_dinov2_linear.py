r"""Parity of the DINOv2 linear protocol (``evals.linear.protocol = "dinov2"``) with the official classifier code.

  /path/to/torch-venv/bin/python benchmarks/_eval_parity_dinov2_linear.py --official_dir /path/to/clones \
      [--protocol dinov2|simdinov2]

prints one JSON line; ``run(official_dir)`` returns the same dict (``benchmarks/official_eval_parity.py``'s
"dinov2_linear" row). ``official_dir``: a clone of facebookresearch/dinov2 (``--protocol simdinov2``: of
RobinWu218/SimDINO), or a folder holding the clones ``dinov2/`` / ``SimDINO/``. Needs a Python with PyTorch and
simdino_jax; nothing official is copied: the official file is parsed and its definitions executed from the clone.

What runs, float32 on CPU, on the SAME features: a frozen random ViT (ours: width 16, depth 4, patch 4, 2
registers, 16 px) whose ``get_intermediate_layers`` (final norm on every block, registers dropped, as DINOv2's
``norm=True``) is the feature model of BOTH sides, on the same random batches, from the same initial weights:

* OFFICIAL (``dinov2/eval/linear.py``): ``create_linear_input``, ``LinearClassifier``, ``AllClassifiers``,
  ``scale_lr`` and ``setup_linear_classifiers`` (the grid, its order, names and lrs) executed from the file; the
  optimizer / scheduler statements of ``run_eval_linear`` (``torch.optim.SGD(optim_param_groups, momentum=0.9,
  weight_decay=0)``, ``max_iter = epochs * epoch_length``, ``CosineAnnealingLR(optimizer, max_iter, eta_min=0)``)
  and the body of ``eval_linear``'s training loop up to ``scheduler.step()`` (forward, the summed
  ``nn.CrossEntropyLoss`` of every classifier, ``zero_grad``, ``backward``, ``step``) executed as written, once
  per batch. The validation's metric (torchmetrics ``MulticlassAccuracy(top_k=1, average="micro")``) and the
  best-classifier loop of ``evaluate_linear_classifiers`` are transcribed below (torchmetrics is not needed).
* OURS: ``linear_dinov2.make_train_step`` (``runner.make_feature_fn`` + feature slices + ``sgd_step``) jitted, fed
  the lrs of ``linear_dinov2.run``'s schedule, and ``linear_dinov2.run`` itself for the final table and selection.

Patches (no official file is edited): ``distributed.get_global_size()`` returns 8 (the per-GPU batch is the
global batch / 8, so ``scale_lr``'s world-size factor is exercised) and ``is_enabled()`` False (no DDP);
``torch.nn.Module.cuda`` and ``torch.Tensor.cuda`` are the identity while the official code runs. The initial
weights of each official classifier are overwritten with ours (the same N(0, 0.01) draw on both sides).

Compared: the lr of every classifier at every iteration (relative), the logits and losses of every classifier at
every iteration, the weights and biases after the last one, each classifier's top-1 on a test set and the selected
classifier's name. ``ok`` when every difference is within ``TOL`` and the selections agree.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

TOL = 1e-5  # absolute, float32: logits / losses O(1), weights O(0.01)
FILES = {"dinov2": ("dinov2", "dinov2/eval/linear.py"), "simdinov2": ("SimDINO", "simdinov2/eval/linear.py")}
DEFINITIONS = ("create_linear_input", "LinearClassifier", "AllClassifiers", "scale_lr", "setup_linear_classifiers")
WORLD_SIZE = 8
# Global batch 256: the official names round the scaled lr to 5 decimals, so below 256 two lrs of the grid can get
# one name (1e-5 and 2e-5 x 32/256 are both "0_00000") and the ModuleDict keeps only one of them.
PRESET = dict(batch_size=256, epochs=2, epoch_length=3, num_classes=5, num_test=40, seed=0)


def official_file(official_dir: str, protocol: str = "dinov2") -> str:
  clone, rel = FILES[protocol]
  for root in (official_dir, os.path.join(official_dir, clone)):
    if os.path.isfile(os.path.join(root, rel)):
      return os.path.join(root, rel)
  raise FileNotFoundError(f"{rel} not found in {official_dir} or {os.path.join(official_dir, clone)}")


class _Distributed:
  """The official ``distributed`` module's two calls used here: 8 processes, no DDP wrapping."""

  @staticmethod
  def get_global_size():
    return WORLD_SIZE

  @staticmethod
  def is_enabled():
    return False


@contextlib.contextmanager
def _cuda_is_identity(torch):
  saved = torch.nn.Module.cuda, torch.Tensor.cuda
  torch.nn.Module.cuda = lambda self, *a, **k: self
  torch.Tensor.cuda = lambda self, *a, **k: self
  try:
    yield
  finally:
    torch.nn.Module.cuda, torch.Tensor.cuda = saved


def load_official(path: str):
  """(namespace with DEFINITIONS, the optimizer/scheduler statements, the training-loop body) from the file."""
  import torch

  tree = ast.parse(open(path).read(), path)
  top = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
  missing = [name for name in DEFINITIONS + ("run_eval_linear", "eval_linear") if name not in top]
  if missing:
    raise ValueError(f"{path}: no top-level {missing}")
  ns = {"torch": torch, "nn": torch.nn, "distributed": _Distributed, "dist": _Distributed}
  exec(compile(ast.Module(body=[top[n] for n in DEFINITIONS], type_ignores=[]), path, "exec"), ns)  # noqa: S102

  def statements(fn, first, last):
    body = top[fn].body
    text = [ast.unparse(s) for s in body]
    i = next(k for k, t in enumerate(text) if t.startswith(first))
    j = next(k for k, t in enumerate(text) if t.startswith(last) and k >= i)
    return compile(ast.Module(body=body[i : j + 1], type_ignores=[]), path, "exec")

  setup = statements("run_eval_linear", "optimizer = torch.optim.SGD", "scheduler = ")
  loop = next(n for n in top["eval_linear"].body if isinstance(n, ast.For))
  text = [ast.unparse(s) for s in loop.body]
  end = text.index("scheduler.step()")
  step = compile(ast.Module(body=loop.body[: end + 1], type_ignores=[]), path, "exec")
  return ns, setup, step, text[: end + 1]


def _backbone():
  from flax import nnx

  from simdino_jax.models.vit import VisionTransformer

  vit = VisionTransformer(
    img_size=16, patch_size=4, embed_dim=16, depth=4, num_heads=2, num_registers=2, rngs=nnx.Rngs(0)
  )
  return nnx.split(vit)


def run(official_dir: str, protocol: str = "dinov2") -> dict:
  import jax
  import jax.numpy as jnp
  import torch
  from flax import nnx

  from simdino_jax.evals import linear_dino, linear_dinov2, runner

  torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
  path = official_file(official_dir, protocol)
  ns, setup_code, step_code, step_lines = load_official(path)
  p = PRESET
  blocks, pools, lrs = linear_dinov2.GRIDS[protocol]
  grid = linear_dinov2.settings(blocks, pools)
  max_n = max(blocks)
  graphdef, params = _backbone()
  spec = linear_dinov2.feature_spec(grid)
  key = runner.spec_key(spec)
  features = jax.jit(runner.make_feature_fn(graphdef, (spec,)))
  layers_fn = jax.jit(lambda prm, x: nnx.merge(graphdef, prm).get_intermediate_layers(x, max_n))

  def feature_model(data):  # the official ModelWithIntermediateLayers' output: ((patch, cls), ...) oldest first
    out = layers_fn(params, jnp.asarray(data.numpy().transpose(0, 2, 3, 1)))
    return tuple((torch.tensor(np.asarray(l["patch"])), torch.tensor(np.asarray(l["cls"]))) for l in out)

  rng = np.random.default_rng(p["seed"])
  iters = p["epochs"] * p["epoch_length"]
  batches = [
    (
      rng.normal(size=(p["batch_size"], 16, 16, 3)).astype(np.float32),
      rng.integers(0, p["num_classes"], p["batch_size"]),
    )
    for _ in range(iters)
  ]
  test_images = rng.normal(size=(p["num_test"], 16, 16, 3)).astype(np.float32)
  test_y = rng.integers(0, p["num_classes"], p["num_test"]).astype(np.int32)
  test_x = np.asarray(features(params, jnp.asarray(test_images))[key])
  dim = 16
  slices = linear_dinov2.feature_slices(grid, dim)

  # -- ours: the jitted step, fed linear_dinov2.run's lr schedule; logits / losses before each step -------------
  peak = linear_dino.scaled_lrs(lrs, p["batch_size"])
  factors = linear_dino.epoch_lr_factors(iters)
  state = linear_dinov2.init_state(
    jax.random.key(p["seed"]), [hi - lo for lo, hi in slices], len(lrs), p["num_classes"]
  )
  init = jax.tree.map(np.asarray, state)
  step = jax.jit(linear_dinov2.make_train_step(runner.make_feature_fn(graphdef, (spec,)), key, slices))
  ours = {"lrs": [], "logits": [], "losses": []}
  for images, labels in batches:
    x = features(params, jnp.asarray(images))[key]
    ours["logits"].append(np.stack([np.asarray(l) for l in linear_dinov2.logits(state, x, slices)]))  # (S, L, B, C)
    lr_now = np.asarray(peak * factors[len(ours["lrs"])], np.float32)
    ours["lrs"].append(lr_now)
    state, loss = step(state, params, jnp.asarray(images), jnp.asarray(labels, jnp.int32), jnp.asarray(lr_now))
    ours["losses"].append(np.asarray(loss))  # (S, L)
  result = linear_dinov2.run(
    step_fn=lambda s, im, lab, lr: step(s, params, im, lab, lr),
    batches=((jnp.asarray(im), jnp.asarray(lab, jnp.int32)) for im, lab in batches),
    test_x=test_x,
    test_y=test_y,
    num_classes=p["num_classes"],
    grid=grid,
    lrs=lrs,
    batch_size=p["batch_size"],
    epochs=p["epochs"],
    epoch_length=p["epoch_length"],
    eval_period=p["epoch_length"],
    seed=p["seed"],
    num_train=p["batch_size"] * iters,
    log=lambda _: None,
  )

  # -- official ------------------------------------------------------------------------------------------------
  with _cuda_is_identity(torch):
    sample = feature_model(torch.from_numpy(batches[0][0][:1].transpose(0, 3, 1, 2)))
    classifiers, groups = ns["setup_linear_classifiers"](
      sample, list(blocks), np.asarray(lrs), p["batch_size"] // WORLD_SIZE, p["num_classes"]
    )
    names = list(classifiers.classifiers_dict)
    want_names = [linear_dinov2.classifier_name(n, a, lr) for n, a in grid for lr in peak]
    modules = list(classifiers.classifiers_dict.values())
    with torch.no_grad():
      for k, m in enumerate(modules):
        g, j = divmod(k, len(lrs))
        m.linear.weight.copy_(torch.from_numpy(init[g]["w"][j].T.copy()))
        m.linear.bias.copy_(torch.from_numpy(init[g]["b"][j].copy()))
    env = {"torch": torch, "optim_param_groups": groups, "epochs": p["epochs"], "epoch_length": p["epoch_length"]}
    exec(setup_code, env)  # noqa: S102  optimizer, max_iter, scheduler as run_eval_linear builds them
    official = {"lrs": [], "logits": [], "losses": []}
    for images, labels in batches:
      official["lrs"].append(np.array([g["lr"] for g in env["optimizer"].param_groups]))
      loop = dict(
        env,
        nn=torch.nn,
        data=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
        labels=torch.from_numpy(labels.astype(np.int64)),
        feature_model=feature_model,
        linear_classifiers=classifiers,
      )
      exec(step_code, loop)  # noqa: S102  eval_linear's loop body up to scheduler.step()
      official["logits"].append(np.stack([loop["outputs"][n].detach().numpy() for n in names]))
      official["losses"].append(np.array([loop["losses"][f"loss_{n}"].item() for n in names]))
    test_tokens = feature_model(torch.from_numpy(test_images.transpose(0, 3, 1, 2).copy()))
    with torch.no_grad():
      test_logits = {n: v.numpy() for n, v in classifiers(test_tokens).items()}
  # evaluate_linear_classifiers, transcribed: MulticlassAccuracy(top_k=1, average="micro") per classifier, then
  #   if metric["top-1"].item() > max_accuracy: max_accuracy, best_classifier = ..., classifier_string
  official_top1 = {n: float(np.mean(np.argmax(v, 1) == test_y)) for n, v in test_logits.items()}
  max_accuracy, best = 0.0, ""
  for n in names:
    if official_top1[n] > max_accuracy:
      max_accuracy, best = official_top1[n], n

  # -- comparison ----------------------------------------------------------------------------------------------
  S, L = len(grid), len(lrs)
  our_logits = np.stack([a.reshape(S * L, *a.shape[2:]) for a in ours["logits"]])
  our_losses = np.stack([a.reshape(-1) for a in ours["losses"]])
  our_lrs = np.stack([np.tile(a, S) for a in ours["lrs"]])
  weights = [(np.asarray(state[k // L]["w"][k % L]).T, m.linear.weight.detach().numpy()) for k, m in enumerate(modules)]
  biases = [(np.asarray(state[k // L]["b"][k % L]), m.linear.bias.detach().numpy()) for k, m in enumerate(modules)]
  our_top1 = {s["name"]: s["top1"] / 100.0 for s in result["settings"]}
  diffs = {
    "lr_rel": float(np.max(np.abs(our_lrs - np.stack(official["lrs"])) / np.stack(official["lrs"]))),
    "logits": float(np.max(np.abs(our_logits - np.stack(official["logits"])))),
    "losses": float(np.max(np.abs(our_losses - np.stack(official["losses"])))),
    "weights": float(max(np.max(np.abs(a - b)) for a, b in weights)),
    "biases": float(max(np.max(np.abs(a - b)) for a, b in biases)),
    "top1": float(max(abs(our_top1[n] - official_top1[n]) for n in names)),
  }
  ok = (
    names == want_names
    and all(v <= TOL for v in diffs.values())
    and result["best_classifier"] == best
    and abs(result["accuracy"] / 100.0 - max_accuracy) <= TOL
  )
  return {
    "protocol": protocol,
    "official_file": path,
    "official_loop_body": step_lines,
    "sizes": dict(p, classifiers=len(names), iterations=iters, world_size_stub=WORLD_SIZE),
    "ours": {
      "best_classifier": result["best_classifier"],
      "accuracy": result["accuracy"],
      "final_loss_mean": float(our_losses[-1].mean()),
    },
    "official": {
      "best_classifier": best,
      "accuracy": 100.0 * max_accuracy,
      "final_loss_mean": float(np.mean(official["losses"][-1])),
      "names_match": names == want_names,
    },
    "diffs": diffs,
    "max_abs_diff": float(max(v for k, v in diffs.items() if k != "lr_rel")),
    "tolerance": TOL,
    "ok": bool(ok),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--official_dir", required=True, help="a dinov2 (or SimDINO) clone, or a folder holding them")
  parser.add_argument("--protocol", default="dinov2", choices=sorted(FILES))
  args = parser.parse_args(argv)
  try:
    official_file(args.official_dir, args.protocol)
  except FileNotFoundError as e:
    parser.error(f"--official_dir: {e}")
  print(json.dumps(run(args.official_dir, args.protocol)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
