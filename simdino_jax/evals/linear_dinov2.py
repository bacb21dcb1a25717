"""DINOv2's linear evaluation (``config.evals.linear.protocol = "dinov2"`` or ``"simdinov2"``): a grid of linear
classifiers trained together on one frozen forward pass per iteration.

What facebookresearch/dinov2 ``dinov2/eval/linear.py`` does (commit b8931f7; the line quoted is its code), and
what we do:

* The grid (``setup_linear_classifiers``): ``for n in n_last_blocks_list: for avgpool in [False, True]: for _lr in
  learning_rates``, one ``LinearClassifier`` each; ``n_last_blocks_list = [1, 4]`` and the 13 lrs ``[1e-5, 2e-5,
  5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1]``: 52 classifiers. SimDINO's fork
  (RobinWu218/SimDINO ``simdinov2/eval/linear.py``, what its README's ``simdinov2/run/eval/linear.py`` runs for the
  SimDINOv2 / DINOv2 figures) keeps the same code with ``n_last_blocks_list = [1,2]``, ``for avgpool in [True]``
  and the lrs ``[2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2]``: 16 classifiers (protocol ``"simdinov2"``).
* Features (``create_linear_input`` on ``get_intermediate_layers(images, max(n), return_class_token=True)`` with
  its default ``norm=True``): the class tokens of the last ``n`` blocks, each after the final norm, concatenated
  oldest first, then with ``avgpool`` the mean of the LAST block's normed patch tokens (registers excluded), cast to
  float32. We run the backbone once per batch for the widest setting, ``[cls_{-N}, ..., cls_{-1}, mean patch]``
  (``runner.make_feature_fn`` spec ("linear", N, any avgpool)), and every setting reads a contiguous slice of it
  (``feature_slices``): n blocks without avgpool are columns ``[(N - n) D, N D)``, with avgpool ``[(N - n) D,
  (N + 1) D)``; the same numbers as ``create_linear_input``.
* Classifier: ``nn.Linear`` with weight N(0, 0.01) and bias 0, each classifier drawn independently; loss
  ``nn.CrossEntropyLoss()`` (mean over the batch) per classifier, summed over the classifiers (each one's gradient
  is its own loss's); ``torch.optim.SGD(param_groups, momentum=0.9, weight_decay=0)`` (PyTorch's momentum, as
  ``linear_dino.sgd_update``), lr ``scale_lr``: lr x batch per GPU x GPUs / 256, i.e. x the global batch / 256
  (``linear_dino.scaled_lrs``); ``CosineAnnealingLR(optimizer, max_iter, eta_min=0)`` stepped every iteration over
  ``max_iter = epochs x epoch_length`` (``linear_dino.epoch_lr_factors(max_iter)``: iteration i at (1 + cos(pi i /
  max_iter)) / 2 of the peak).
* Defaults (``get_args_parser``): 10 epochs of ``epoch_length`` 1250 iterations, ``--batch-size`` 128 per GPU on
  the 8 GPUs of ``run/submit.py``'s default node (global 1024: 1250 x 1024 is one pass over ImageNet's 1.28 M
  images), ``eval_period_iterations`` 1250. SimDINO's fork also sets ``epoch_length = len(train) // global batch``
  when it is given <= 0 (``epoch_length=0`` here).
* Training data: ``SamplerType.SHARDED_INFINITE`` with ``shuffle=True, seed=0``: an endless stream of fresh
  permutations of the training set, cut into full batches across permutation boundaries (``stream_batches``; each
  pass a new permutation, ``linear_dino.epoch_order``); views ``make_classification_train_transform``:
  ``RandomResizedCrop(224, interpolation=BICUBIC)`` (scale (0.08, 1), ratio (3/4, 4/3)) + ``RandomHorizontalFlip``
  (``linear_dino.train_view(bicubic=True)``, drawn per (seed, pass, example)), re-drawn every time an image comes
  round again; the frozen backbone runs on every batch (no feature cache).
* Validation (``make_classification_eval_transform``: ``Resize(256, bicubic)`` + ``CenterCrop(224)``,
  ``linear_dino.eval_view``): every ``eval_period`` iterations (``(iteration + 1) % eval_period == 0 and iteration
  != max_iter - 1``) and after the last one; the metric ``MEAN_ACCURACY`` is torchmetrics' micro-averaged top-1 /
  top-5 (the plain hit rate). The val view is deterministic, so its features are extracted once.
* Result: DINOv2 keeps the classifier with the highest top-1 at the FINAL evaluation (``metric["top-1"] >
  max_accuracy``, strict: the first of equal ones in the grid's order), and reports its accuracy; the earlier
  evaluations are only logged. We report the same, plus every setting's (n_last_blocks, avgpool, lr) final top-1 /
  top-5 and its top-1 at each evaluation.

Everything trains in ONE jitted program per iteration: the backbone's forward pass, then every setting's lrs
(``jax.vmap`` over the lrs inside ``linear_dino.sgd_update``), the batch split over the devices. Not reproduced:
the per-rank order of DINOv2's sharded sampler (rank r takes every W-th index of each permutation: the global batch
holds the same kind of sample, drawn differently); fp16 autocast of the backbone (``evals.*.dtype`` decides); the
val loader's ``DistributedSampler`` padding (it repeats a few images to split the set evenly over the GPUs; we
score every image once); checkpointing / resuming.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from simdino_jax.data import device_augment
from simdino_jax.evals import linear, linear_dino
from simdino_jax.progress import hms

# dinov2/eval/linear.py get_args_parser defaults; SimDINO's fork (simdinov2/eval/linear.py) where it differs.
DINOV2_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
SIMDINOV2_LRS = (2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2)
GRIDS = {  # protocol -> (n_last_blocks_list, avgpool choices, learning rates)
  "dinov2": ((1, 4), (False, True), DINOV2_LRS),
  "simdinov2": ((1, 2), (True,), SIMDINOV2_LRS),
}
EPOCHS, EPOCH_LENGTH = 10, 1250
GLOBAL_BATCH = 1024  # --batch-size 128 per GPU x 8 GPUs (run/submit.py: --ngpus 8, --nodes 1)


def settings(n_last_blocks: Sequence[int], avgpool: Sequence[bool]) -> list[tuple[int, bool]]:
  """(n, avgpool) of every feature choice, in setup_linear_classifiers' order (n outer, avgpool inner)."""
  return [(int(n), bool(a)) for n in n_last_blocks for a in avgpool]


def feature_spec(grid: Sequence[tuple[int, bool]]) -> tuple:
  """The one runner feature spec every setting is a slice of: the widest n, with avgpool if any setting has it."""
  return ("linear", max(n for n, _ in grid), any(a for _, a in grid))


def feature_slices(grid: Sequence[tuple[int, bool]], dim: int) -> list[tuple[int, int]]:
  """[lo, hi) columns of each setting in ``feature_spec(grid)``'s layout [cls_{-N}, ..., cls_{-1}, (mean patch)]."""
  top = max(n for n, _ in grid)
  return [((top - n) * dim, (top + int(a)) * dim) for n, a in grid]


def classifier_name(n: int, avgpool: bool, scaled_lr: float) -> str:
  """DINOv2's key of a classifier: f"classifier_{n}_blocks_avgpool_{avgpool}_lr_{lr:.5f}" with "." -> "_"."""
  return f"classifier_{n}_blocks_avgpool_{avgpool}_lr_{scaled_lr:.5f}".replace(".", "_")


def eval_iterations(max_iter: int, eval_period: int) -> list[int]:
  """Numbers of iterations done at each validation: every ``eval_period`` (not at the last iteration, which the
  final validation covers), then ``max_iter``."""
  every = [i + 1 for i in range(max_iter) if eval_period > 0 and (i + 1) % eval_period == 0 and i != max_iter - 1]
  return every + [max_iter]


# -- training views (host) ---------------------------------------------------------------------------------------
def stream_batches(
  source,
  *,
  seed: int,
  batch_size: int,
  crop: int,
  num_iterations: int,
  resize: str = "pil",
  shard_index: int = 0,
  shard_count: int = 1,
  pool=None,
) -> Iterator[dict[str, np.ndarray]]:
  """This process's part of each of ``num_iterations`` global batches of the infinite shuffled stream:
  ``{"image": (b, crop, crop, 3) uint8, "label": (b,) int32}``, ``b = batch_size // shard_count`` (process ``k``
  holds slots ``[k b, (k + 1) b)``). Stream position p is example ``epoch_order(seed, p // n, n)[p % n]``, its
  view drawn by ``example_rng(seed, p // n, example)``: a pure function of the seed, whatever the processes,
  threads or batch. Computed by ``pool`` one batch ahead of the one yielded."""
  n = len(source)
  per = batch_size // shard_count
  orders: dict[int, np.ndarray] = {}

  def order(pass_):
    if pass_ not in orders:
      for old in [k for k in orders if k < pass_ - 1]:  # keep at most two permutations
        del orders[old]
      orders[pass_] = linear_dino.epoch_order(seed, pass_, n)
    return orders[pass_]

  def one(pass_, index):
    ex = source[int(index)]
    view = linear_dino.train_view(ex["image"], linear_dino.example_rng(seed, pass_, int(index)), crop, resize, True)
    return view, int(ex["label"])

  def submit(it):
    lo = it * batch_size + shard_index * per
    slots = [divmod(p, n) for p in range(lo, lo + per)]
    work = [(pass_, int(order(pass_)[i])) for pass_, i in slots]
    return [pool.submit(one, *w) for w in work] if pool is not None else work

  def assemble(work):
    image = np.zeros((per, crop, crop, 3), np.uint8)
    label = np.zeros((per,), np.int32)
    for slot, w in enumerate(work):
      image[slot], label[slot] = w.result() if pool is not None else one(*w)
    return {"image": image, "label": label}

  pending = submit(0) if num_iterations > 0 else None
  for it in range(num_iterations):
    current, pending = pending, (submit(it + 1) if it + 1 < num_iterations else None)
    yield assemble(current)


# -- the classifier grid (device) --------------------------------------------------------------------------------
def init_state(key: jax.Array, dims: Sequence[int], num_lrs: int, num_classes: int) -> tuple[dict, ...]:
  """Per setting g: {"w": (L, D_g, C) ~ N(0, 0.01), "b": (L, C) zeros, momentum buffers "mw", "mb" zeros}; every
  classifier drawn independently, as each LinearClassifier's ``weight.data.normal_(0, 0.01)``."""
  state = []
  for g, d in enumerate(dims):
    w = 0.01 * jax.random.normal(jax.random.fold_in(key, g), (num_lrs, d, num_classes), jnp.float32)
    b = jnp.zeros((num_lrs, num_classes), jnp.float32)
    state.append({"w": w, "b": b, "mw": jnp.zeros_like(w), "mb": jnp.zeros_like(b)})
  return tuple(state)


def sgd_step(state: tuple, x: jax.Array, y: jax.Array, lrs: jax.Array, slices) -> tuple[tuple, jax.Array]:
  """One SGD step of every classifier: setting g reads columns ``slices[g]`` of the float32 features ``x`` (B, F);
  each lr's classifier minimises its own mean cross-entropy over the batch (all slots are real examples). Returns
  the new state and the (S, L) losses before the step."""
  ones = jnp.ones(x.shape[:1], jnp.float32)
  new, losses = [], []
  for s, (lo, hi) in zip(state, slices):
    s, loss = linear_dino.sgd_update(s, x[:, lo:hi], y, ones, lrs)
    new.append(s)
    losses.append(loss)
  return tuple(new), jnp.stack(losses)


def logits(state: tuple, x: jax.Array, slices) -> list[jax.Array]:
  """(L, B, C) logits of every setting's classifiers on features ``x`` (float32, HIGHEST precision)."""
  return [
    jnp.einsum("bd,ldc->lbc", x[:, lo:hi], s["w"], precision=jax.lax.Precision.HIGHEST) + s["b"][:, None]
    for s, (lo, hi) in zip(state, slices)
  ]


def make_train_step(feature_fn: Callable, key: str, slices) -> Callable:
  """(state, backbone params, images, labels, lrs (L,)) -> (state, losses (S, L)): the frozen backbone's features of
  the batch (one forward pass for the whole grid) and one SGD step of every classifier; uint8 views are normalised
  on the device."""

  def step(state, params, images, labels, lrs):
    if images.dtype == jnp.uint8:
      images = device_augment.normalize(images.astype(jnp.float32))
    x = jax.lax.stop_gradient(feature_fn(params, images)[key]).astype(jnp.float32)
    return sgd_step(state, x, labels, lrs, slices)

  return step


# -- the loop ----------------------------------------------------------------------------------------------------
def run(
  *,
  step_fn: Callable,
  batches: Iterator,
  test_x,
  test_y,
  num_classes: int,
  grid: Sequence[tuple[int, bool]],
  lrs: Sequence[float],
  batch_size: int,
  epochs: int,
  epoch_length: int,
  eval_period: int,
  seed: int,
  num_train: int,
  protocol: str = "dinov2",
  log: Callable[[str], None] = print,
) -> dict:
  """The protocol's iterations: ``batches`` yields (images, labels) device batches, ``step_fn(state, images, labels,
  lrs)`` trains every classifier on one; validation on the test features at ``eval_iterations``. Returns the
  summary written to linear.json (module doc)."""
  base = tuple(float(lr) for lr in lrs)
  peak = linear_dino.scaled_lrs(base, batch_size)
  max_iter = epochs * epoch_length
  factors = linear_dino.epoch_lr_factors(max_iter)  # CosineAnnealingLR(T_max=max_iter), stepped per iteration
  test_x = jnp.asarray(test_x, jnp.float32)
  dim = int(test_x.shape[1]) // (max(n for n, _ in grid) + int(any(a for _, a in grid)))
  slices = feature_slices(grid, dim)
  state = init_state(jax.random.key(seed), [hi - lo for lo, hi in slices], len(base), num_classes)
  checkpoints = eval_iterations(max_iter, eval_period)
  curve = np.zeros((len(checkpoints), len(grid), len(base), 2))  # per validation, setting, lr: top-1 / top-5
  t0 = last_log = time.time()
  done, losses = 0, []
  for images, labels in batches:
    if done == max_iter:
      break
    state, loss = step_fn(state, images, labels, jnp.asarray(peak * factors[done], jnp.float32))
    losses.append(loss)
    done += 1
    now = time.time()
    if done in checkpoints:
      k = checkpoints.index(done)
      for g, (lo, hi) in enumerate(slices):
        curve[k, g] = linear.accuracies({"w": state[g]["w"], "b": state[g]["b"]}, test_x[:, lo:hi], test_y)
      g, i = np.unravel_index(np.argmax(curve[k, :, :, 0]), curve.shape[1:3])
      mean_loss = np.mean(np.stack([np.asarray(v) for v in losses]), axis=0)
      losses = []
      eta = hms((now - t0) * (max_iter - done) / done)
      log(
        f"linear ({protocol}) iteration {done}/{max_iter} | loss {mean_loss[g, i]:.4f} top-1 {curve[k, g, i, 0]:.2f}% "
        f"({_name(grid[g], base[i])}) | elapsed {hms(now - t0)} ETA {eta}"
      )
      last_log = now
    elif now - last_log > 60:
      log(
        f"linear ({protocol}) iteration {done}/{max_iter} | elapsed {hms(now - t0)} "
        f"ETA {hms((now - t0) * (max_iter - done) / done)}"
      )
      last_log = now
  if done != max_iter:
    raise ValueError(f"the training stream ended after {done} of {max_iter} iterations")

  final = curve[-1]
  # DINOv2's selection: the first classifier in the grid's order whose final top-1 beats every earlier one.
  flat = final[:, :, 0].reshape(-1)
  g, i = divmod(int(np.argmax(flat)), len(base))
  table = [
    {
      "name": classifier_name(n, a, float(peak[j])),
      "n_last_blocks": n,
      "avgpool": a,
      "lr": base[j],
      "scaled_lr": float(peak[j]),
      "top1": float(final[s, j, 0]),
      "top5": float(final[s, j, 1]),
      "top1_per_eval": [float(v) for v in curve[:, s, j, 0]],
    }
    for s, (n, a) in enumerate(grid)
    for j in range(len(base))
  ]
  best = table[g * len(base) + i]
  return {
    "accuracy": best["top1"],
    "top5": best["top5"],
    "lr": best["lr"],
    "scaled_lr": best["scaled_lr"],
    "best_classifier": best["name"],
    "best_n_last_blocks": best["n_last_blocks"],
    "best_avgpool": best["avgpool"],
    "settings": table,
    "eval_iterations": checkpoints,
    "epochs": epochs,
    "epoch_length": epoch_length,
    "iterations": max_iter,
    "batch_size": batch_size,
    "num_train": int(num_train),
    "num_test": int(test_x.shape[0]),
    "feature_dim": int(test_x.shape[1]),
    "seconds": time.time() - t0,
  }


def _name(setting: tuple[int, bool], lr: float) -> str:
  return f"{setting[0]} block(s), avgpool {setting[1]}, lr {lr:g}"
