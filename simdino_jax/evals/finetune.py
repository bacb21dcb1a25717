"""Full fine-tuning of the trained backbone with a new linear head (``type="finetune"``): the BEiT / iBOT ImageNet
recipe and DeiT's small-dataset recipe, checkpointed and resumable.

The DINO-vMF paper (Tables 14-15) fine-tunes "on ImageNet-1K following the same training protocol as Bao et al.
(2021) [BEiT] ... ViT-S/16 and ViT-B/16 for 200 and 100 epochs ... the best result after a sweep over the learning
rates {8e-4, 9e-4, 1e-3, 2e-3}. For fine-tuning on smaller datasets, we follow the fine-tuning recipe of Touvron et
al. (2021) [DeiT] of training for 1000 epochs with a small learning rate of 7.5e-6". The official code of both is
iBOT's (/work/official/ibot): ``evaluation/classification_layer_decay/run_class_finetuning.py`` (BEiT's script;
below ``rcf.py``) with its ``engine_for_finetuning.py``, ``optim_factory.py``, ``utils.py``, ``modeling_finetune.py``
and the commands of ``run.sh`` / ``evaluation/README.md``; and ``evaluation/eval_cls.py`` (DeiT's main.py) with the
``run.sh`` commands ``cifar10_cls`` / ``cifar_cls`` / ``flwrs_cls``.

``recipe="beit"`` (ImageNet) / ``"deit"`` (small datasets). A field left at its "recipe" value (0, -1.0, "" or ())
takes the recipe's, per model size for BEiT (S: width <= 384, B: <= 768, L: wider):

=================  ==========================  ==================================================================
field              beit (S / B / L)            deit            source (iBOT repo)
=================  ==========================  ==================================================================
epochs             200 / 100 / 50              1000            README.md:25-48; run.sh:179 / run.sh:256
batch_size         1024 (128 x 8 GPUs)         768 (96 x 8)    rcf.py:40, run.sh (8 GPUs) / run.sh:254
lr                 4e-3 (as given)             7.5e-6 x B/512  rcf.py:92 / run.sh:255, eval_cls.py:690
min_lr             1e-6                        1e-5            rcf.py:98 / eval_cls.py:99
warmup_epochs      20 / 20 / 5                 5               run.sh:180, README.md:47 / eval_cls.py:104
warmup_lr          0 (linspace from 0)         1e-6            utils.py:379-387 (rcf's --warmup_lr is unused)
                                                               / eval_cls.py:97
schedule           per step, cosine            per epoch,      utils.py:379-396, engine_for_finetuning.py:60
                                               timm cosine     / eval_cls.py:87,695,768 (timm CosineLRScheduler)
weight_decay       0.05, constant              0.05            rcf.py:86,88 / eval_cls.py:84
no weight decay    1-D, bias, pos_embed,       1-D, bias       optim_factory.py:84, modeling_finetune.py:343-344
                   cls_token                                   / timm create_optimizer (no no_weight_decay())
layer_decay        0.75 / 0.65 / 0.75          1.0 (none)      README.md:30,37,44, run.sh:181 / (none)
drop_path          0.1 / 0.2 / 0.4             0.1             README.md:29,36,43 / eval_cls.py:64
smoothing          0.1                         0.1             rcf.py:111 / eval_cls.py:119
mixup, cutmix      0.8, 1.0                    0.8, 1.0        run.sh:182-183 / eval_cls.py:138,140 (prob 1,
                                                               switch 0.5, batch mode: rcf.py:136-141)
auto_augment       rand-m9-mstd0.5-inc1        the same        rcf.py:109 / eval_cls.py:116
reprob             0.25 (pixel, 1 box)         0.25            rcf.py:120-125 / eval_cls.py:128-133
hflip              0.5                         0.5             timm create_transform's default
pooling            cls (--use_cls)             cls             run.sh:187 / eval_cls.py:48 (avgpool 0)
head init          trunc_normal(.02) x 0.001   trunc_normal    modeling_finetune.py:315,319-320, rcf.py:148 /
                   (std 2e-5), bias 0          (.02), bias 0   eval_cls.py:626-629, models/vision_transformer.py:174
ema_decay          0 (off)                     0 (see below)   rcf.py:71 / eval_cls.py:67-70,769
optimiser          AdamW (0.9, 0.999), 1e-8, no clipping       rcf.py:76-82 / eval_cls.py:74-80
=================  ==========================  ==================================================================

Layer-wise lr decay (optim_factory.py:32-43, rcf.py:546-552): ``get_num_layer_for_vit`` gives cls_token,
mask_token, pos_embed and patch_embed.* layer 0, blocks.i layer i + 1 and everything else (the final norm, fc_norm,
the head) layer depth + 1, and a parameter's lr is lr x layer_decay ** (depth + 1 - layer); decoupled weight decay is
multiplied by the same lr (engine_for_finetuning.py:60-62, torch AdamW). ``optim.layer_id`` / ``optim.lr_multipliers``
(pre-training's DINOv2 rule) give those ids on ``backbone/...`` names (the extra register tokens: layer 0), so they
are reused here (tests/test_finetune.py checks them against a NumPy transcription of the official groups).

Model: our ViT with the recipe's drop path (linear over the blocks, modeling_finetune.py:299), the trained weights,
and a new ``Linear(width, classes)``: on the final-normed cls token ("cls"), or with ``pooling="mean"`` on
``fc_norm(mean of the patch tokens)`` where ``fc_norm`` is a new LayerNorm and the trained final norm is unused
(modeling_finetune.py:307-308,366-372; registers are not averaged). Loss: timm's LabelSmoothingCrossEntropy (mean
over the batch). Training views: RandomResizedCrop (scale (0.08, 1), bicubic) + horizontal flip (timm's
transforms_imagenet_train), or for images of at most 32 px RandomCrop(size, padding=4) + flip (rcf.py:272-276,
eval_cls.py:329-333; ``crop_padding``); validation: resize (x 256 / 224; BEiT bilinear, rcf.py:279-294, DeiT bicubic,
eval_cls.py:336-346) + centre crop, none at <= 32 px.
ImageNet mean / std (run.sh passes --imagenet_default_mean_and_std; eval_cls.py:345). Every epoch is a fresh
permutation, the last partial batch dropped (drop_last=True, rcf.py:351, eval_cls.py:585); steps per epoch =
len(train) // batch (rcf.py:540).

Augmentations: H7's pure functions of timm's (tested against timm there): ``data/randaugment.py`` on the host after
the crop and flip, ``data/random_erasing.py`` on the normalised batch and ``data/mixup.py`` (timm's Mixup in batch
mode with the smoothed soft targets, then SoftTargetCrossEntropy) inside the jitted step; ``mixup_cutmix=False``,
``auto_augment="none"``, ``reprob=0`` turn each off. Not reproduced (stated in every result's ``recipe``): DeiT's
repeated augmentation (RASampler, 3 repeats); timm's colour jitter (off whenever an auto-augment policy is set, as
both recipes set one); mixed precision (autocast): the fine-tune computes in ``config.eval.dtype``. DeiT's script
keeps a model EMA (decay 0.99996) but validates the raw model (eval_cls.py:769), so ``ema_decay`` is 0 for both
recipes; with ``ema_decay > 0`` the EMA (timm ModelEma: ema = d ema + (1 - d) w after each step) is validated beside
the raw model.

Validation every ``eval_every`` epochs and at the end on the test split: top-1, top-5 and mean-per-class accuracy;
``metric`` ("top1" or "mean_per_class", the papers' choice for Aircraft / Flowers / Pets / Caltech) picks the
``accuracy`` reported: its best over the validations (the scripts' "Max accuracy") and its last value. ``lr_sweep``:
each lr its own fine-tune in its own directory, the best lr reported (DINO-vMF's sweep:
``lr_sweep=(8e-4, 9e-4, 1e-3, 2e-3)``).

Files, per lr, under DIR/eval/finetune{suffix}/lr<lr>/: ``checkpoints/N`` (orbax, every ``checkpoint_every`` steps,
at each validation and at the end; the whole state: step, weights, Adam moments, EMA), ``metrics.jsonl`` and
``tensorboard/`` (loss, lr and the validations), ``curves.png``, ``validations.json``. The same command resumes from
the newest checkpoint and ends bitwise as an uninterrupted run (the batches and drop-path draws are functions of
(seed, step)); a finished lr is not trained again. In ``python -m simdino_jax.evaluate``, SIGTERM saves a checkpoint
at the next step and exits with status 75, as training does; inside a training run the trainer's own handler keeps
SIGTERM (it acts after the evaluation round), so a kill there keeps the fine-tune's last periodic checkpoint. The
checkpointer and metrics log are the trainer's (``io/checkpointing.py``, ``train/metrics.py``), handed over by the
entry points through ``runner.Context`` (evals/ imports neither layer).
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from PIL import Image

from simdino_jax import optim
from simdino_jax.data import augment, device_augment, mixup, randaugment, random_erasing
from simdino_jax.errors import ConfigError, require
from simdino_jax.evals import linear_dino, runner
from simdino_jax.models.network import backbone_kwargs
from simdino_jax.models.vit import VisionTransformer, trunc_normal_init
from simdino_jax.tree import map_with_name

RECIPES = ("beit", "deit")
POOLINGS = ("cls", "mean")
METRICS = ("top1", "mean_per_class")
SCHEDULES = ("per_step", "per_epoch")
STOP_EXIT_CODE = 75  # training's "re-run to resume" status (README; launch scripts)

# Per-size BEiT values (evaluation/README.md:25-48, run.sh:179-181): size -> fields.
BEIT_BY_SIZE = {
  "S": dict(epochs=200, drop_path=0.1, layer_decay=0.75, warmup_epochs=20),
  "B": dict(epochs=100, drop_path=0.2, layer_decay=0.65, warmup_epochs=20),
  "L": dict(epochs=50, drop_path=0.4, layer_decay=0.75, warmup_epochs=5),
}
RECIPE_DEFAULTS = {
  "beit": dict(
    batch_size=1024,
    lr=4e-3,
    lr_scaling="none",
    min_lr=1e-6,
    warmup_lr=0.0,
    schedule="per_step",
    weight_decay=0.05,
    no_decay_tokens=True,
    smoothing=0.1,
    mixup=0.8,
    cutmix=1.0,
    pooling="cls",
    head_init_scale=0.001,
    ema_decay=0.0,
    hflip=0.5,
    crop_padding=4,
    auto_augment="rand-m9-mstd0.5-inc1",
    reprob=0.25,
  ),
  "deit": dict(
    epochs=1000,
    batch_size=768,
    lr=7.5e-6,
    lr_scaling="linear_512",
    min_lr=1e-5,
    warmup_lr=1e-6,
    warmup_epochs=5,
    schedule="per_epoch",
    weight_decay=0.05,
    no_decay_tokens=False,
    layer_decay=1.0,
    drop_path=0.1,
    smoothing=0.1,
    mixup=0.8,
    cutmix=1.0,
    pooling="cls",
    head_init_scale=1.0,
    ema_decay=0.0,
    hflip=0.5,
    crop_padding=4,
    auto_augment="rand-m9-mstd0.5-inc1",
    reprob=0.25,
  ),
}
# Fields whose value means "the recipe's": numbers at -1 (0 is meaningful for them), the rest at 0 / "".
_MINUS_ONE = ("min_lr", "warmup_lr", "warmup_epochs", "weight_decay", "layer_decay", "drop_path", "smoothing")
_MINUS_ONE += ("mixup", "cutmix", "head_init_scale", "ema_decay", "hflip", "reprob", "crop_padding")
_ZERO = ("epochs", "batch_size", "lr", "lr_scaling", "schedule", "pooling", "auto_augment")


def size_of(embed_dim: int) -> str:
  """The BEiT row a backbone width takes: S up to 384, B up to 768, L beyond."""
  return "S" if embed_dim <= 384 else ("B" if embed_dim <= 768 else "L")


def resolve(cfg, embed_dim: int) -> dict:
  """The settings a fine-tune uses: ``cfg``'s fields with those at their "recipe" value replaced by the recipe's."""
  r = dict(cfg)
  recipe = dict(RECIPE_DEFAULTS.get(cfg.recipe, RECIPE_DEFAULTS["beit"]))
  if cfg.recipe != "deit":
    recipe.update(BEIT_BY_SIZE[cfg.get("size") or size_of(embed_dim)])
  for k in _MINUS_ONE:
    if r[k] == -1:
      r[k] = recipe[k]
  for k in _ZERO:
    if not r[k]:
      r[k] = recipe[k]
  r["no_decay_tokens"] = recipe["no_decay_tokens"]
  r["lr_sweep"] = tuple(float(lr) for lr in r["lr_sweep"])
  r["lrs"] = r["lr_sweep"] or (float(r["lr"]),)
  return r


# -- the optimiser and its schedule ------------------------------------------------------------------------------------
def beit_cosine(base: float, final: float, epochs: int, niter_per_ep: int, warmup_epochs: int, start: float = 0.0):
  """utils.cosine_scheduler (classification_layer_decay/utils.py:379-396): a value per iteration, linspace from
  ``start`` to ``base`` over the warm-up iterations, then cosine from ``base`` to ``final``."""
  warmup_iters = warmup_epochs * niter_per_ep
  warmup = np.linspace(start, base, warmup_iters) if warmup_epochs > 0 else np.zeros((0,))
  iters = np.arange(epochs * niter_per_ep - warmup_iters)
  cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
  return np.concatenate([warmup, cosine])


def timm_epoch_lr(epoch: int, base: float, final: float, epochs: int, warmup_epochs: int, warmup_lr: float) -> float:
  """The lr DeiT's loop trains epoch ``epoch`` at: timm's CosineLRScheduler(t_initial=epochs, lr_min=final,
  warmup_t=warmup_epochs, warmup_lr_init=warmup_lr) sets warmup_lr at construction and ``step(e)`` after epoch e
  (eval_cls.py:768) sets the value at t = e for epoch e + 1: epochs 0 and 1 both train at warmup_lr."""
  t = max(epoch - 1, 0) if epoch > 0 else None
  if t is None:
    return warmup_lr if warmup_epochs > 0 else base
  if t < warmup_epochs:
    return warmup_lr + t * (base - warmup_lr) / warmup_epochs
  if t >= epochs:  # past the single cycle (cycle_limit 1)
    return final
  return final + 0.5 * (base - final) * (1 + math.cos(math.pi * t / epochs))


def lr_table(r: dict, lr: float, steps_per_epoch: int) -> np.ndarray:
  """(total_steps,) float32 peak-lr values, one per step, as the recipe's scheduler gives them."""
  if r["schedule"] == "per_step":
    values = beit_cosine(lr, r["min_lr"], r["epochs"], steps_per_epoch, r["warmup_epochs"], r["warmup_lr"])
  else:
    per_epoch = [
      timm_epoch_lr(e, lr, r["min_lr"], r["epochs"], r["warmup_epochs"], r["warmup_lr"]) for e in range(r["epochs"])
    ]
    values = np.repeat(np.asarray(per_epoch, np.float64), steps_per_epoch)
  return values.astype(np.float32)


def augmentations(r: dict):
  """(MixupConfig or None, ErasingConfig or None, RandAugmentConfig or None) of the resolved settings: timm's Mixup
  (prob 1, switch 0.5, batch mode: rcf.py:136-141), RandomErasing (pixel mode, 1 box: rcf.py:120-125) and the
  RandAugment policy with create_transform's fill, round(255 x ImageNet mean) (run.sh passes
  --imagenet_default_mean_and_std; eval_cls.py keeps timm's default mean)."""
  mix = None
  if r["mixup_cutmix"] and (r["mixup"] > 0 or r["cutmix"] > 0):
    mix = mixup.MixupConfig(mixup_alpha=r["mixup"], cutmix_alpha=r["cutmix"], label_smoothing=r["smoothing"])
  erase = random_erasing.ErasingConfig(probability=r["reprob"]) if r["reprob"] > 0 else None
  ra = None
  if r["auto_augment"] != "none":
    ra = randaugment.parse_rand_augment(
      r["auto_augment"], mean=augment.IMAGENET_MEAN, field="evals.finetune.auto_augment"
    )
  return mix, erase, ra


def decays(name: str, leaf, no_decay_tokens: bool) -> bool:
  """Weight decay of the fine-tuning groups (optim_factory.py:84): not on 1-D tensors and biases, nor (BEiT's
  no_weight_decay(), modeling_finetune.py:343-344) on pos_embed and cls_token. The mask token, unused, never moves."""
  if jnp.ndim(leaf) <= 1 or name.endswith("bias") or name == "backbone/mask_token":
    return False
  return not (no_decay_tokens and name in ("backbone/pos_embed", "backbone/cls_token"))


def finetune_optimizer(params, *, r: dict, lrs: np.ndarray, depth: int) -> optax.GradientTransformation:
  """torch AdamW over the recipe's parameter groups: Adam, decoupled constant weight decay on the decayed leaves, the
  step's lr from ``lrs`` (indexed by the update count), times each leaf's layer-decay scale (decay included)."""
  mask = map_with_name(lambda name, leaf: decays(name, leaf, r["no_decay_tokens"]), params)
  table = jnp.asarray(lrs)
  parts = [
    optax.scale_by_adam(b1=r["b1"], b2=r["b2"], eps=r["adam_eps"]),
    optax.add_decayed_weights(r["weight_decay"], mask=mask),
    optax.scale_by_learning_rate(lambda count: table[jnp.minimum(count, table.shape[0] - 1)]),
  ]
  if r["layer_decay"] != 1.0:
    parts.append(optim.scale_by_tree(optim.lr_multipliers(params, depth=depth, layer_decay=r["layer_decay"])))
  if r["clip_grad"] > 0:
    parts.insert(0, optax.clip_by_global_norm(r["clip_grad"]))
  return optax.chain(*parts)


# -- the loss ----------------------------------------------------------------------------------------------------------
def label_smoothing_ce(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
  """timm's LabelSmoothingCrossEntropy: (1 - s) NLL + s x mean over classes of -log p, mean over the batch."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
  return jnp.mean((1.0 - smoothing) * nll + smoothing * -jnp.mean(logp, axis=-1))


# -- the model ---------------------------------------------------------------------------------------------------------
def init_head(key: jax.Array, dim: int, num_classes: int, *, init_scale: float, pooling: str) -> dict:
  """The new head: trunc_normal(0.02) weight x init_scale and zero bias (modeling_finetune.py:315,319-320); with mean
  pooling a fresh LayerNorm ``fc_norm`` (ones, zeros)."""
  head = {
    "kernel": trunc_normal_init(0.02)(key, (dim, num_classes)) * init_scale,
    "bias": jnp.zeros((num_classes,), jnp.float32),
  }
  out = {"head": head}
  if pooling == "mean":
    out["fc_norm"] = {"scale": jnp.ones((dim,), jnp.float32), "bias": jnp.zeros((dim,), jnp.float32)}
  return out


def _layer_norm(x, p, eps=1e-6):
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def make_logits_fn(graphdef, pooling: str):
  """(params {"backbone", "head"[, "fc_norm"]}, images, key or None) -> float32 logits; ``key`` drives drop path."""

  def logits_fn(params, images, key):
    vit = nnx.merge(graphdef, params["backbone"])
    b = images.shape[0]
    if pooling == "cls":
      feat = vit(images, key=key)["cls"]
    else:
      # BEiT's mean pooling: the blocks' tokens WITHOUT the trained final norm, averaged, then fc_norm.
      # The ViT's own block loop (a private method: its public calls all apply the final norm).
      x, _, _ = vit._blocks(vit.prepare_tokens(images), key=key, return_attention=False)
      tokens = x.reshape(b, -1, vit.embed_dim)[:, 1 + vit.num_registers :]
      feat = _layer_norm(jnp.mean(tokens.astype(jnp.float32), axis=1), params["fc_norm"])
    feat = feat.astype(jnp.float32)
    return jnp.matmul(feat, params["head"]["kernel"], precision=jax.lax.Precision.HIGHEST) + params["head"]["bias"]

  return logits_fn


def soft_target_ce(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """timm's SoftTargetCrossEntropy (the criterion with mixup / cutmix): sum(-t log p) over classes, batch mean."""
  return jnp.mean(jnp.sum(-targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1))


def make_train_step(
  logits_fn,
  tx,
  *,
  smoothing: float,
  ema_decay: float,
  seed: int,
  num_classes: int = 0,
  mix: mixup.MixupConfig | None = None,
  erasing: random_erasing.ErasingConfig | None = None,
):
  """(state, images uint8, labels) -> (state, loss): one AdamW step. The step's key fold_in(key(seed), step) drives
  drop path, random erasing (on the normalised batch, as timm's transform ends) and mixup / cutmix (timm's Mixup on
  the batch, then SoftTargetCrossEntropy; else LabelSmoothingCrossEntropy)."""

  def step(state, images, labels):
    images = device_augment.normalize(images.astype(jnp.float32))
    step_key = jax.random.fold_in(jax.random.key(seed), state["step"])
    key, erase_key, mix_key = (jax.random.fold_in(step_key, i) for i in range(3))
    if erasing is not None:
      images = random_erasing.random_erasing(erase_key, images, erasing)
    targets = None
    if mix is not None:
      images, targets = mixup.mixup(mix_key, images, labels, num_classes, mix)

    def loss_fn(params):
      logits = logits_fn(params, images, key)
      if targets is not None:
        return soft_target_ce(logits, targets)
      return label_smoothing_ce(logits, labels, smoothing)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
    if ema_decay > 0:
      new["ema"] = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state["ema"], params)
    return new, loss

  return step


# -- views -------------------------------------------------------------------------------------------------------------
def train_view(
  image,
  rng: np.random.Generator,
  size: int,
  hflip: float = 0.5,
  rand_augment: randaugment.RandAugmentConfig | None = None,
  padding: int = 4,
) -> np.ndarray:
  """timm's training view without erasing: RandomResizedCrop(size, scale (0.08, 1), bicubic, PIL) or at <= 32 px
  RandomCrop(size, padding=``padding``) (the recipes' 4, meant for CIFAR's 32 px; module docstring), then a
  horizontal flip with probability ``hflip``, then RandAugment; uint8 (size, size, 3)."""
  image = augment.to_uint8(image)
  if size > 32:
    top, left, h, w = augment.rrc_params(
      image.shape[0], image.shape[1], rng, linear_dino.RRC_SCALE, linear_dino.RRC_RATIO
    )
    x = image[top : top + h, left : left + w]
    if (h, w) != (size, size):
      x = np.asarray(Image.fromarray(np.ascontiguousarray(x)).resize((size, size), Image.BICUBIC))
  else:
    if image.shape[:2] != (size, size):  # the official assumes CIFAR's 32 px; other small images: resized to it first
      image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    top = int(rng.integers(0, padded.shape[0] - size + 1))
    left = int(rng.integers(0, padded.shape[1] - size + 1))
    x = padded[top : top + size, left : left + size]
  if rng.random() < hflip:
    x = x[:, ::-1]
  if rand_augment is not None:  # timm's order: crop, flip, then the auto-augment policy
    x = randaugment.rand_augment(np.ascontiguousarray(x), rng, rand_augment)
  return np.ascontiguousarray(x)


def eval_view(image, size: int, bilinear: bool = False) -> np.ndarray:
  """Resize of the shorter side + centre crop, or at <= 32 px the image as is (a smaller or larger one: its shorter
  side resized to ``size``, then centre-cropped, as ``train_view`` resizes it). BEiT's script resizes to
  int(size / (224 / 256)) with torchvision's ``interpolation=2``, PIL's BILINEAR (rcf.py:281-289: ``bilinear``);
  DeiT's to int(256 / 224 x size), bicubic (eval_cls.py:337-341)."""
  if size <= 32 or not bilinear:
    return linear_dino.eval_view(image, size, size if size <= 32 else int(256 / 224 * size))
  image = augment.to_uint8(image)
  h, w = image.shape[:2]
  short = int(size / (224 / 256))
  new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)  # (width, height); long truncated
  x = np.asarray(Image.fromarray(image).resize(new, Image.BILINEAR))
  top, left = int(round((x.shape[0] - size) / 2.0)), int(round((x.shape[1] - size) / 2.0))
  return augment.normalize(x[top : top + size, left : left + size])


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, 0xF17E, epoch, index])


# -- scoring -----------------------------------------------------------------------------------------------------------
def scores(logits: np.ndarray, labels: np.ndarray) -> dict:
  """top-1 / top-5 / mean-per-class accuracy (percent) of ``logits`` (N, C); mean per class over the classes present."""
  logits, labels = np.asarray(logits, np.float64), np.asarray(labels)
  pred = np.argmax(logits, -1)
  k = min(5, logits.shape[1])
  top5 = np.any(np.argsort(-logits, axis=-1, kind="stable")[:, :k] == labels[:, None], -1)
  hit = pred == labels
  classes = np.unique(labels)
  per_class = [np.mean(hit[labels == c]) for c in classes]
  return {
    "top1": 100.0 * float(np.mean(hit)),
    "top5": 100.0 * float(np.mean(top5)),
    "mean_per_class": 100.0 * float(np.mean(per_class)),
  }


class _Stop:
  """SIGTERM during a fine-tune (when nobody else handles it): a checkpoint at the next step, then exit 75."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class FinetuneStopped(SystemExit):
  """A fine-tune stopped at a checkpoint on request (SIGTERM): exit status 75, "re-run to resume". A SystemExit, so
  that the evaluation round does not take it for a failure and go on."""

  def __init__(self, msg: str):
    super().__init__(STOP_EXIT_CODE)
    self.msg = msg

  def __str__(self) -> str:
    return self.msg


class FinetuneEvaluator(runner.Evaluator):
  """Full fine-tuning with a new head; see the module docstring for the recipes, files and resumption."""

  # recipe: "beit" (ImageNet) or "deit" (small datasets); size: "" (from the width) or "S" / "B" / "L" for BEiT's
  # per-size values. Fields at -1 / 0 / "": the recipe's (module docstring's table). lr_sweep: () or several lrs,
  # each its own fine-tune. eval_every: epochs between validations (the end is always validated). checkpoint_every:
  # steps between checkpoints (validations and the end always save). log_every: steps between progress lines.
  # image_size: 0 = the run's eval image size. metric: what ``accuracy`` reports. mixup_cutmix: timm's Mixup with
  # the recipe's mixup / cutmix alphas (False: label smoothing alone); auto_augment: "" the recipe's RandAugment,
  # "none" off, or a timm "rand-..." string; reprob: random-erasing probability (0 off); hflip: flip probability;
  # crop_padding: RandomCrop's zero padding at <= 32 px (0: no shift; the recipes' 4 is 1/8 of CIFAR's 32 px).
  DEFAULTS = dict(
    recipe="beit",
    size="",
    epochs=0,
    batch_size=0,
    lr=0.0,
    lr_scaling="",
    lr_sweep=(),
    min_lr=-1.0,
    warmup_lr=-1.0,
    warmup_epochs=-1,
    schedule="",
    weight_decay=-1.0,
    layer_decay=-1.0,
    drop_path=-1.0,
    smoothing=-1.0,
    mixup=-1.0,
    cutmix=-1.0,
    mixup_cutmix=True,
    auto_augment="",
    reprob=-1.0,
    hflip=-1.0,
    crop_padding=-1,
    pooling="",
    head_init_scale=-1.0,
    ema_decay=-1.0,
    b1=0.9,
    b2=0.999,
    adam_eps=1e-8,
    clip_grad=0.0,
    eval_every=1,
    checkpoint_every=1000,
    log_every=50,
    image_size=0,
    metric="top1",
  )
  init_keys = ()
  stop_after_steps: int | None = None  # tests: behave as if SIGTERM came after this many steps of this call

  def run(self, ctx, params, feats) -> dict:
    del feats
    if getattr(ctx, "checkpointer", None) is None or getattr(ctx, "metrics_log", None) is None:
      raise ConfigError(
        f"config.evals.{self.name}: fine-tuning needs the checkpointer and metrics log of the entry points "
        "(python -m simdino_jax.evaluate or training); this evaluation context has none"
      )
    kw = backbone_kwargs(self.config.model)
    r = resolve(self.cfg, kw["embed_dim"])
    size = self.cfg.image_size or ctx.image_size
    out = epath.Path(ctx.out_dir) / f"{self.name}{ctx.suffix}"
    per_lr = {}
    for lr in r["lrs"]:
      per_lr[f"{lr:g}"] = self._finetune(ctx, params, r, lr, size, kw, out / f"lr{lr:g}")
    best = max(per_lr, key=lambda k: per_lr[k]["best"][r["metric"]])  # first of equals: the first lr given
    b = per_lr[best]
    recipe = {k: r[k] for k in sorted(r) if k not in ("lrs", "lr_sweep", "lr")}
    recipe["not_reproduced"] = "DeiT's repeated augmentation (3 repeats), autocast (computed in config.eval.dtype)"
    return {
      "accuracy": b["best"][r["metric"]],
      "metric": r["metric"],
      "top1": b["best"]["top1"],
      "top5": b["best"]["top5"],
      "mean_per_class": b["best"]["mean_per_class"],
      "best_epoch": b["best"]["epoch"],
      "last": b["last"],
      "lr": float(best),
      "per_lr": per_lr,
      "recipe": recipe,
      "image_size": size,
      "features": f"fine-tuned backbone + new head ({r['pooling']} pooling)",
      "dir": os.fspath(out),
    }

  # -- one lr ----------------------------------------------------------------------------------------------------------
  def _finetune(self, ctx, params, r, lr, size, kw, out: epath.Path) -> dict:
    c, config = self.cfg, self.config
    n_dev, n_proc = jax.device_count(), jax.process_count()
    train_src, test_src = ctx.train_source, ctx.test_source
    n = len(train_src)
    batch = r["batch_size"]
    if batch > n:  # a small dataset: one full-dataset batch per step rather than no step at all
      batch = max(n_dev, n // n_dev * n_dev)
      batch -= batch % (2 * n_dev) if r["mixup_cutmix"] and batch >= 2 * n_dev else 0  # mixup pairs i, B - 1 - i
      ctx.log(f"{self.name}: batch {r['batch_size']} > {n} training images: batch {batch}")
    spe = max(1, n // batch)  # drop_last
    if r["warmup_epochs"] > r["epochs"]:  # the official scheduler asserts (utils.py:395); the values resolve here
      raise ConfigError(
        f"config.evals.{self.name}.warmup_epochs: {r['warmup_epochs']} warm-up epochs (the recipe's when -1) exceed "
        f"the {r['epochs']} epochs: give fewer"
      )
    total = r["epochs"] * spe
    peak = lr * batch / 512.0 if r["lr_scaling"] == "linear_512" else lr
    lrs = lr_table(r, peak, spe)
    vit_kw = dict(kw, drop_path_rate=r["drop_path"], drop_path_uniform=False, dtype=runner.DTYPES[ctx.dtype])
    graphdef = nnx.split(nnx.eval_shape(lambda: VisionTransformer(**vit_kw, rngs=nnx.Rngs(0))))[0]
    logits_fn = make_logits_fn(graphdef, r["pooling"])
    rep, bsh = ctx.replicated, ctx.batch_sharding
    head = init_head(
      jax.random.key(config.seed),
      kw["embed_dim"],
      ctx.num_classes,
      init_scale=r["head_init_scale"],
      pooling=r["pooling"],
    )
    model = {"backbone": params, **head}
    # Copies: the step donates its state, and the caller's backbone (training's teacher) must survive.
    model = jax.tree.map(lambda x: jnp.copy(jax.device_put(x, rep)), model)
    tx = finetune_optimizer(model, r=r, lrs=lrs, depth=kw["depth"])
    state = {"step": jnp.zeros((), jnp.int32), "params": model, "opt_state": tx.init(model)}
    if r["ema_decay"] > 0:
      state["ema"] = jax.tree.map(jnp.copy, model)  # its own buffers (the step donates the state)
    state = jax.device_put(state, rep)
    record = dict(
      {k: v for k, v in r.items() if k not in ("lrs", "lr_sweep")},
      lr=lr,
      peak_lr=peak,
      batch=batch,
      image_size=size,
      steps_per_epoch=spe,
      total_steps=total,
      num_classes=ctx.num_classes,
      seed=config.seed,
    )
    record = json.loads(json.dumps(record))
    ckpt = ctx.checkpointer(os.fspath(out / "checkpoints"))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state)
    restored = ckpt.restore_latest(target, config=record)
    start = 0
    if restored is not None:
      state, start = restored
      ctx.log(f"{self.name} (lr {lr:g}): resuming from {ckpt.path(start)}")
    history_path = out / "validations.json"
    history = []
    if start and history_path.exists():
      history = [h for h in json.loads(history_path.read_text()) if h["step"] <= start]
    mix_cfg, erase_cfg, ra_cfg = augmentations(r)
    step_fn = ctx.compiled(
      ("finetune_step", self.name, lr, batch),
      lambda: jax.jit(
        make_train_step(
          logits_fn,
          tx,
          smoothing=r["smoothing"],
          ema_decay=r["ema_decay"],
          seed=config.seed,
          num_classes=ctx.num_classes,
          mix=mix_cfg,
          erasing=erase_cfg,
        ),
        donate_argnums=0,
        in_shardings=(rep, bsh, bsh),
        out_shardings=(rep, rep),
      ),
    )
    ema = r["ema_decay"] > 0

    def eval_fn(p, images):
      images = device_augment.normalize(images.astype(jnp.float32)) if images.dtype == jnp.uint8 else images
      out_ = {"logits": logits_fn(p[0], images, None)}
      if ema:
        out_["ema_logits"] = logits_fn(p[1], images, None)
      return out_

    evaluate = ctx.compiled(
      ("finetune_eval", self.name, lr, r["pooling"], ema),
      lambda: jax.jit(eval_fn, in_shardings=(rep, bsh), out_shardings=bsh),
    )

    bilinear = c.recipe == "beit"  # the validation resize of each script (eval_view)

    def validate(step: int) -> dict:
      p = (state["params"], state["ema"] if ema else None)
      outs, labels = ctx.extract(
        p, test_src, evaluate, image_size=size, transform=lambda im: eval_view(im, size, bilinear)
      )
      h = {"step": step, "epoch": step / spe, **scores(outs["logits"], labels)}
      if ema:
        h.update({f"ema_{k}": v for k, v in scores(outs["ema_logits"], labels).items()})
      return h

    ctx.log(
      f"{self.name} (lr {lr:g}, recipe {c.recipe}): {n} train / {len(test_src)} test images at {size}px, batch "
      f"{batch}, {r['epochs']} epochs x {spe} steps, peak lr {peak:.3g}, layer decay {r['layer_decay']}, drop path "
      f"{r['drop_path']}, {r['pooling']} pooling -> {out}"
    )
    per = batch // n_proc
    t0 = time.time()
    eval_steps = {min(total, e * spe) for e in range(c.eval_every, r["epochs"] + 1, c.eval_every)} | {total}
    stop_at = None if self.stop_after_steps is None else start + self.stop_after_steps
    with (
      ctx.metrics_log(
        os.fspath(out),
        total_steps=total,
        start_step=start,
        batch_size=batch,
        progress_keys=("loss", "val_top1", "val_mean_per_class"),
        config=None,
        is_main=ctx.is_main,
        tensorboard=True,
        wandb={},
        printer=ctx.log,
      ) as metrics,
      concurrent.futures.ThreadPoolExecutor(linear_dino.default_threads()) as pool,
      _Stop() as stop,
    ):

      def host_batch(step):
        epoch, i = divmod(step, spe)
        order = linear_dino.epoch_order(config.seed, epoch, n)
        lo = i * batch + jax.process_index() * per
        idx = order[lo : lo + per]

        def one(index):
          ex = train_src[int(index)]
          rng = example_rng(config.seed, epoch, int(index))
          view = train_view(ex["image"], rng, size, r["hflip"], ra_cfg, padding=r["crop_padding"])
          return view, int(ex["label"])

        return [pool.submit(one, j) for j in idx]

      def assemble(work):
        views = [w.result() for w in work]
        images = np.stack([v[0] for v in views])
        labels = np.asarray([v[1] for v in views], np.int32)
        return (
          jax.make_array_from_process_local_data(bsh, images),
          jax.make_array_from_process_local_data(bsh, labels),
        )

      pending = host_batch(start) if start < total else None
      losses = []
      for step in range(start, total):
        current, pending = pending, (host_batch(step + 1) if step + 1 < total else None)
        images, labels = assemble(current)
        state, loss = step_fn(state, images, labels)
        losses.append(loss)
        done = step + 1
        values = {}
        if done in eval_steps:
          h = validate(done)
          history.append(h)
          values.update({f"val_{k}": v for k, v in h.items() if k not in ("step", "epoch")})
        if done % c.log_every == 0 or values or done == total:
          values = {"loss": float(np.mean([np.asarray(x) for x in losses])), "lr": float(lrs[step]), **values}
          losses = []
          metrics.write(done, values)
        stopping = stop.requested or (stop_at is not None and done >= stop_at and done < total)
        if done % c.checkpoint_every == 0 or done in eval_steps or done == total or stopping:
          if ctx.is_main and (done in eval_steps or stopping):
            history_path.parent.mkdir(parents=True, exist_ok=True)
            history_path.write_text(json.dumps(history, indent=1))
          ckpt.save(done, state, record)
        if stopping:
          ckpt.wait()
          ckpt.close()
          msg = (
            f"{self.name} (lr {lr:g}): stopped at step {done}/{total}, checkpoint {ckpt.path(done)}: run the same "
            "command again to resume"
          )
          ctx.log(msg)
          raise FinetuneStopped(msg)
      ckpt.wait()
      ckpt.close()
      metrics.draw_curves()
    if not history:
      raise ConfigError(f"config.evals.{self.name}: no validation was recorded in {history_path}")
    if ctx.is_main:
      history_path.parent.mkdir(parents=True, exist_ok=True)
      history_path.write_text(json.dumps(history, indent=1))
    metric = r["metric"]
    best = max(history, key=lambda h: h[metric])  # the first of equal values
    last = history[-1]
    keys = ("top1", "top5", "mean_per_class")
    return {
      "best": {**{k: best[k] for k in keys}, "epoch": best["epoch"], "step": best["step"]},
      "last": {k: last[k] for k in keys} | ({f"ema_{k}": last[f"ema_{k}"] for k in keys} if ema else {}),
      "peak_lr": peak,
      "batch_size": batch,
      "epochs": r["epochs"],
      "steps": total,
      "validations": history,
      "seconds": time.time() - t0,
    }

  def metrics(self, result: dict) -> dict:
    return {"top1": result["top1"], "top5": result["top5"], "mean_per_class": result["mean_per_class"]}

  def summary(self, r: dict) -> str:
    return (
      f"{r['metric']} {r['accuracy']:.2f}% (top-1 {r['top1']:.2f}%, last {r['last']['top1']:.2f}%) at lr {r['lr']:g}"
      f" (best of {len(r['per_lr'])} lrs, recipe {r['recipe']['recipe']})"
    )

  @classmethod
  def validate(cls, cfg, field, *, config, patch, depth, num_devices) -> None:
    require(cfg.recipe in RECIPES, f"{field}.recipe", f"must be one of {RECIPES}, got {cfg.recipe!r}")
    require(
      cfg.size in ("", *BEIT_BY_SIZE),
      f"{field}.size",
      f"must be '' (from the width) or one of {sorted(BEIT_BY_SIZE)}, got {cfg.size!r}",
    )
    require(cfg.pooling in ("", *POOLINGS), f"{field}.pooling", f"must be '' or one of {POOLINGS}, got {cfg.pooling!r}")
    require(cfg.schedule in ("", *SCHEDULES), f"{field}.schedule", f"must be '' or one of {SCHEDULES}")
    require(cfg.lr_scaling in ("", "none", "linear_512"), f"{field}.lr_scaling", "must be '', 'none' or 'linear_512'")
    require(cfg.metric in METRICS, f"{field}.metric", f"must be one of {METRICS}, got {cfg.metric!r}")
    require(isinstance(cfg.lr, (int, float)) and cfg.lr >= 0, f"{field}.lr", "must be >= 0 (0: the recipe's)")
    require(
      all(isinstance(lr, (int, float)) and lr > 0 for lr in cfg.lr_sweep),
      f"{field}.lr_sweep",
      f"must be () or a tuple of positive learning rates, got {cfg.lr_sweep!r}",
    )
    for name in ("epochs", "batch_size", "image_size"):
      require(isinstance(cfg[name], int) and cfg[name] >= 0, f"{field}.{name}", "must be >= 0 (0: the recipe's)")
    for name in ("eval_every", "checkpoint_every", "log_every"):
      require(isinstance(cfg[name], int) and cfg[name] >= 1, f"{field}.{name}", f"must be >= 1, got {cfg[name]!r}")
    require(
      cfg.drop_path == -1 or 0 <= cfg.drop_path < 1, f"{field}.drop_path", "must be in [0, 1) or -1 (the recipe's)"
    )
    require(cfg.layer_decay == -1 or 0 < cfg.layer_decay <= 1, f"{field}.layer_decay", "must be in (0, 1] or -1")
    require(cfg.ema_decay == -1 or 0 <= cfg.ema_decay < 1, f"{field}.ema_decay", "must be in [0, 1) or -1")
    require(cfg.smoothing == -1 or 0 <= cfg.smoothing < 1, f"{field}.smoothing", "must be in [0, 1) or -1")
    require(cfg.hflip == -1 or 0 <= cfg.hflip <= 1, f"{field}.hflip", "must be in [0, 1] or -1 (the recipe's 0.5)")
    require(
      isinstance(cfg.crop_padding, int) and cfg.crop_padding >= -1,
      f"{field}.crop_padding",
      f"must be >= 0 or -1 (the recipe's 4), got {cfg.crop_padding!r}",
    )
    size = cfg.image_size or runner.eval_image_size(config)
    require(size % patch == 0, f"{field}.image_size", f"{size} is not a multiple of the patch size {patch}")
    batch = cfg.batch_size or RECIPE_DEFAULTS[cfg.recipe]["batch_size"]
    require(batch % num_devices == 0, f"{field}.batch_size", f"{batch} is not divisible by the {num_devices} devices")
    require(cfg.reprob == -1 or 0 <= cfg.reprob <= 1, f"{field}.reprob", "must be in [0, 1] or -1 (the recipe's 0.25)")
    if cfg.auto_augment not in ("", "none"):
      randaugment.parse_rand_augment(cfg.auto_augment, field=f"{field}.auto_augment")
    if cfg.mixup_cutmix:
      batch = cfg.batch_size or RECIPE_DEFAULTS[cfg.recipe]["batch_size"]
      require(batch % 2 == 0, f"{field}.batch_size", f"mixup / cutmix pair example i with B - 1 - i: {batch} is odd")
