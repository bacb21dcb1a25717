"""The linear evaluation plug-in (``type="linear"``): one of four protocols on the frozen backbone.

``protocol="frozen"`` (evals/linear.py): features extracted once with the round's shared pass, standardised, an lr
sweep in one program; fast, for small data. ``protocol="dino"`` (evals/linear_dino.py): DINO's eval_linear.py,
RandomResizedCrop + flip views re-drawn every epoch through the frozen backbone (the SimDINO README's command, and
DINO's paper with a feature choice and an lr sweep). ``protocol="dinov2"`` (evals/linear_dinov2.py): DINOv2's
eval/linear.py, a grid of feature choices x lrs trained together on one frozen forward pass per iteration;
``"simdinov2"``: the same code with SimDINO's fork's grid (what its README runs for the SimDINOv2 / DINOv2 figures).

A field left at 0 / () takes the protocol's value, that of the official script's defaults (``PROTOCOL_DEFAULTS``),
so a protocol is chosen by its name alone. DIR/eval/NAME.json holds ``accuracy`` (the best classifier's top-1),
``lr``, ``protocol``, ``epochs``, ``batch_size``, the feature choice and the table of every lr (``per_lr``; the
DINOv2 protocols: ``settings``, one row per (n_last_blocks, avgpool, lr)).
"""

from __future__ import annotations

import concurrent.futures

import jax

from simdino_jax.errors import require
from simdino_jax.evals import linear, linear_dino, linear_dinov2, runner
from simdino_jax.models.network import is_resnet

PROTOCOLS = ("frozen", "dino", "dinov2", "simdinov2")
# What a field left at 0 / () means, per protocol: the official script's default. frozen: our probe's own choice;
# dino: facebookresearch/dino eval_linear.py (--n_last_blocks 4, --lr 1e-3, --epochs 100, --batch_size_per_gpu 128
# on the README's 8 GPUs); dinov2 / simdinov2: evals/linear_dinov2.py (GRIDS, 10 epochs, 128 per GPU x 8 GPUs).
PROTOCOL_DEFAULTS = {
  "frozen": dict(n_last_blocks=1, epochs=100, batch_size=256, lrs=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)),
  "dino": dict(n_last_blocks=4, epochs=100, batch_size=1024, lrs=(1e-3,)),
  **{
    name: dict(
      n_last_blocks=max(blocks),
      epochs=linear_dinov2.EPOCHS,
      batch_size=linear_dinov2.GLOBAL_BATCH,
      lrs=lrs,
      n_last_blocks_grid=blocks,
      avgpool_grid=pools,
    )
    for name, (blocks, pools, lrs) in linear_dinov2.GRIDS.items()
  },
}


def resolve(cfg) -> dict:
  """The settings a run uses: ``cfg``'s fields, with those left at 0 / () replaced by the protocol's defaults
  (an unknown protocol resolves as "frozen"; ``validate`` refuses it)."""
  r = dict(cfg)
  for k, v in PROTOCOL_DEFAULTS.get(cfg.protocol, PROTOCOL_DEFAULTS["frozen"]).items():
    if k in r and not r[k]:
      r[k] = v
  r["lrs"] = tuple(float(lr) for lr in r["lrs"])
  return r


class LinearEvaluator(runner.Evaluator):
  """Linear classifiers on frozen features, an lr sweep or grid; see the module docstring for the four protocols."""

  # protocol "frozen": lrs used as given; "dino": lrs per 256 images (x batch_size / 256), cosine per epoch, best
  # epoch reported; "dinov2" / "simdinov2": the grid n_last_blocks_grid x avgpool_grid x lrs (per 256 images),
  # cosine per iteration over epochs x epoch_length, validated every eval_period iterations (0: epoch_length), the
  # final validation's best reported; epoch_length 0: len(train) // batch_size (SimDINO's fork). n_last_blocks,
  # epochs, batch_size, lrs and the grids at 0 / (): the protocol's (PROTOCOL_DEFAULTS); crop_size 0: the eval
  # image size; resize_size 0: round(crop x 256 / 224) (ImageNet: 224 / 256).
  DEFAULTS = dict(
    protocol="frozen",
    n_last_blocks=0,
    avgpool=False,
    lrs=(),
    epochs=0,
    batch_size=0,
    crop_size=0,
    resize_size=0,
    n_last_blocks_grid=(),
    avgpool_grid=(),
    epoch_length=linear_dinov2.EPOCH_LENGTH,
    eval_period=0,
  )
  init_keys = ("accuracy",)

  @property
  def spec(self) -> tuple:
    # A ResNet has no patch tokens: DINO's eval_linear.py reads ``model(inp)``, the pooled feature (itself the
    # average over the last map), whatever --avgpool_patchtokens and --n_last_blocks say; so does this spec.
    avgpool = bool(self.cfg.avgpool) and not is_resnet(self.config.model)
    return ("linear", resolve(self.cfg)["n_last_blocks"], avgpool)

  def feature_specs(self) -> tuple:
    return (self.spec,) if self.cfg.protocol == "frozen" else ()  # the others re-draw training views

  def run(self, ctx, params, feats) -> dict:
    c, r = self.cfg, resolve(self.cfg)
    if c.protocol in linear_dinov2.GRIDS:
      blocks, pools = tuple(r["n_last_blocks_grid"]), tuple(bool(a) for a in r["avgpool_grid"])
      what = f"cls of the last n block(s) for n in {list(blocks)}, x avg-pooled patch tokens in {list(pools)}"
      common = dict(protocol=c.protocol, features=what, n_last_blocks_grid=blocks, avgpool_grid=pools, lrs=r["lrs"])
      return dict(self._dinov2(ctx, params, r), **common)
    n, avgpool = r["n_last_blocks"], self.spec[2]
    what = f"cls of the last {n} block(s)" + (" + avg-pooled patch tokens" if avgpool else "")
    if is_resnet(self.config.model):
      what = "the ResNet's pooled feature (DINO's eval_linear.py: model(inp), whatever n_last_blocks / avgpool)"
    common = dict(protocol=c.protocol, features=what, n_last_blocks=n, avgpool=avgpool)
    if c.protocol == "dino":
      return dict(self._dino(ctx, params, r), **common)
    key = runner.spec_key(self.spec)
    (train_f, train_y), (test_f, test_y) = feats["train"], feats["test"]
    result = linear.linear_probe(
      train_f[key],
      train_y,
      test_f[key],
      test_y,
      num_classes=ctx.num_classes,
      lrs=r["lrs"],
      epochs=r["epochs"],
      batch_size=r["batch_size"],
      seed=self.config.seed,
    )
    return dict(result, **common)

  def _dino(self, ctx, params, r) -> dict:
    """DINO's protocol: per epoch, fresh RandomResizedCrop + flip views of the training set (host threads) through
    the frozen backbone and every lr's classifier (one jitted step, batch split over the devices); validation each
    epoch on the test set's resize + centre-crop features, extracted once."""
    c, config = self.cfg, self.config
    train_src, test_src = ctx.train_source, ctx.test_source
    crop, resize_to = linear_dino.resolve_sizes(c.crop_size, c.resize_size, ctx.image_size)
    key = runner.spec_key(self.spec)
    raw = runner.make_feature_fn(ctx.graphdef, (self.spec,))
    test_f, test_y = self._test_features(ctx, params, self.spec, raw, crop, resize_to)
    b, rep = ctx.batch_sharding, ctx.replicated
    step = ctx.compiled(
      ("linear_dino_step", self.spec),
      lambda: jax.jit(
        linear_dino.make_train_step(raw, key),
        donate_argnums=0,
        in_shardings=(rep, ctx.param_sharding, b, b, b, rep),
        out_shardings=(rep, rep),
      ),
    )
    n_dev, n_proc = jax.device_count(), jax.process_count()
    # Slots per step: the batch, or fewer when the whole training set is smaller (a tiny dataset would otherwise
    # push mostly padding through the backbone); a multiple of the devices either way. The lr scales with the
    # configured batch, as DINO's does.
    slots = min(r["batch_size"], -(-len(train_src) // n_dev) * n_dev)
    ctx.log(
      f"linear (dino): {len(train_src)} train / {len(test_src)} test images, crop {crop} (eval: resize "
      f"{resize_to} + centre crop), batch {r['batch_size']}, {r['epochs']} epochs, {len(r['lrs'])} lrs"
    )

    with concurrent.futures.ThreadPoolExecutor(linear_dino.default_threads()) as pool:

      def batches(epoch):
        for batch in linear_dino.train_batches(
          train_src,
          epoch=epoch,
          seed=config.seed,
          batch_size=slots,
          crop=crop,
          resize=config.data.augment.get("resize", "cv2"),
          shard_index=jax.process_index(),
          shard_count=n_proc,
          pool=pool,
        ):
          yield tuple(jax.make_array_from_process_local_data(b, batch[k]) for k in ("image", "label", "weight"))

      result = linear_dino.run(
        step_fn=lambda state, images, labels, weights, lrs: step(state, params, images, labels, weights, lrs),
        batches_fn=batches,
        test_x=test_f[key],
        test_y=test_y,
        num_classes=ctx.num_classes,
        dim=int(test_f[key].shape[1]),
        lrs=r["lrs"],
        batch_size=r["batch_size"],
        epochs=r["epochs"],
        seed=config.seed,
        num_train=len(train_src),
        log=ctx.log,
      )
    return dict(result, crop_size=crop, resize_size=resize_to)

  def _dinov2(self, ctx, params, r) -> dict:
    """DINOv2's protocol (evals/linear_dinov2.py): an endless shuffled stream of RandomResizedCrop (bicubic) + flip
    views (host threads), one frozen forward pass per iteration for every (n_last_blocks, avgpool, lr) classifier
    (one jitted step, batch split over the devices), validation every eval_period iterations on the test set's
    resize + centre-crop features, extracted once; the final validation's best classifier is reported."""
    c, config = self.cfg, self.config
    train_src, test_src = ctx.train_source, ctx.test_source
    crop, resize_to = linear_dino.resolve_sizes(c.crop_size, c.resize_size, ctx.image_size)
    grid = linear_dinov2.settings(r["n_last_blocks_grid"], r["avgpool_grid"])
    spec = linear_dinov2.feature_spec(grid)
    key = runner.spec_key(spec)
    raw = runner.make_feature_fn(ctx.graphdef, (spec,))
    test_f, test_y = self._test_features(ctx, params, spec, raw, crop, resize_to)
    dim = int(test_f[key].shape[1]) // (spec[1] + int(spec[2]))
    slices = tuple(linear_dinov2.feature_slices(grid, dim))
    b, rep = ctx.batch_sharding, ctx.replicated
    step = ctx.compiled(
      ("linear_dinov2_step", spec, slices),
      lambda: jax.jit(
        linear_dinov2.make_train_step(raw, key, slices),
        donate_argnums=0,
        in_shardings=(rep, ctx.param_sharding, b, b, rep),
        out_shardings=(rep, rep),
      ),
    )
    batch_size = r["batch_size"]
    epoch_length = r["epoch_length"] or max(1, len(train_src) // batch_size)  # SimDINO's fork for <= 0
    eval_period = r["eval_period"] or epoch_length
    ctx.log(
      f"linear ({c.protocol}): {len(train_src)} train / {len(test_src)} test images, crop {crop} (eval: resize "
      f"{resize_to} + centre crop), batch {batch_size}, {r['epochs']} x {epoch_length} iterations, "
      f"{len(grid)} feature choices x {len(r['lrs'])} lrs"
    )
    with concurrent.futures.ThreadPoolExecutor(linear_dino.default_threads()) as pool:
      stream = linear_dinov2.stream_batches(
        train_src,
        seed=config.seed,
        batch_size=batch_size,
        crop=crop,
        num_iterations=r["epochs"] * epoch_length,
        resize=config.data.augment.get("resize", "cv2"),
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        pool=pool,
      )
      result = linear_dinov2.run(
        step_fn=lambda state, images, labels, lrs: step(state, params, images, labels, lrs),
        batches=(tuple(jax.make_array_from_process_local_data(b, x[k]) for k in ("image", "label")) for x in stream),
        test_x=test_f[key],
        test_y=test_y,
        num_classes=ctx.num_classes,
        grid=grid,
        lrs=r["lrs"],
        batch_size=batch_size,
        epochs=r["epochs"],
        epoch_length=epoch_length,
        eval_period=eval_period,
        seed=config.seed,
        num_train=len(train_src),
        protocol=c.protocol,
        log=ctx.log,
      )
    return dict(result, crop_size=crop, resize_size=resize_to, eval_period=eval_period)

  @staticmethod
  def _test_features(ctx, params, spec, raw, crop, resize_to):
    """(features, labels) of the test set's deterministic view (resize + centre crop), extracted once."""
    return ctx.extract(
      params,
      ctx.test_source,
      ctx.backbone_fn(("features", (spec,)), raw),
      image_size=crop,
      transform=lambda image: linear_dino.eval_view(image, crop, resize_to),
    )

  def metrics(self, result: dict) -> dict:
    return {"top1": result["accuracy"], "top5": result["top5"], "lr": result["lr"]}

  def summary(self, r: dict) -> str:
    if "settings" in r:
      return (
        f"top-1 {r['accuracy']:.2f}% with {r['best_n_last_blocks']} block(s), avgpool {r['best_avgpool']}, lr "
        f"{r['lr']:g} (best of {len(r['settings'])} classifiers after {r['iterations']} iterations, protocol "
        f"{r['protocol']})"
      )
    return (
      f"top-1 {r['accuracy']:.2f}% at lr {r['lr']:g} (best of {len(r['per_lr'])} lrs, {r['epochs']} epochs, "
      f"protocol {r['protocol']})"
    )

  @classmethod
  def validate(cls, cfg, field, *, config, patch, depth, num_devices) -> None:
    require(
      cfg.protocol in PROTOCOLS,
      f"{field}.protocol",
      f"must be 'frozen' (cached features), 'dino' (DINO's eval_linear.py), 'dinov2' (DINOv2's eval/linear.py) or "
      f"'simdinov2' (SimDINO's fork of it), got {cfg.protocol!r}",
    )
    require(
      all(isinstance(lr, (int, float)) and lr > 0 for lr in cfg.lrs),
      f"{field}.lrs",
      f"must be () (the protocol's) or a tuple of positive learning rates, got {cfg.lrs!r}",
    )
    require(
      isinstance(cfg.epochs, int) and cfg.epochs >= 0,
      f"{field}.epochs",
      f"must be >= 1 (or 0: the protocol's), got {cfg.epochs!r}",
    )
    require(
      isinstance(cfg.batch_size, int) and cfg.batch_size >= 0,
      f"{field}.batch_size",
      f"must be >= 1 (or 0: the protocol's), got {cfg.batch_size!r}",
    )
    require(
      isinstance(cfg.n_last_blocks, int) and 0 <= cfg.n_last_blocks <= depth,
      f"{field}.n_last_blocks",
      f"must be in [1, depth={depth}] (or 0: the protocol's), got {cfg.n_last_blocks}",
    )
    require(
      all(isinstance(n, int) and 1 <= n <= depth for n in cfg.n_last_blocks_grid),
      f"{field}.n_last_blocks_grid",
      f"must be () (the protocol's) or block counts in [1, depth={depth}], got {cfg.n_last_blocks_grid!r}",
    )
    require(
      all(isinstance(a, bool) for a in cfg.avgpool_grid),
      f"{field}.avgpool_grid",
      f"must be () (the protocol's) or a tuple of booleans, got {cfg.avgpool_grid!r}",
    )
    for name in ("epoch_length", "eval_period"):
      value = cfg[name]
      require(
        isinstance(value, int) and value >= 0,
        f"{field}.{name}",
        f"must be >= 1 iterations (or 0: {'len(train) // batch_size' if name == 'epoch_length' else 'epoch_length'})"
        f", got {value!r}",
      )
    crop, resize = cfg.crop_size, cfg.resize_size
    require(
      isinstance(crop, int) and (crop == 0 or (crop > 0 and crop % patch == 0)),
      f"{field}.crop_size",
      f"must be 0 (the eval image size) or a positive multiple of the patch size {patch}, got {crop!r}",
    )
    eval_size = runner.eval_image_size(config)
    require(
      isinstance(resize, int) and (resize == 0 or resize >= (crop or eval_size)),
      f"{field}.resize_size",
      f"must be 0 (crop x 256 / 224) or >= the crop size {crop or eval_size}, got {resize!r}",
    )
    r = resolve(cfg)
    if cfg.protocol != "frozen":
      require(
        r["batch_size"] % num_devices == 0,
        f"{field}.batch_size",
        f"{r['batch_size']} is not divisible by the {num_devices} devices (protocol {cfg.protocol!r} splits it over "
        "them)",
      )
    # The protocol's own values (fields at 0 / ()) must fit the backbone too.
    if cfg.protocol in linear_dinov2.GRIDS:
      require(
        not is_resnet(config.model),
        f"{field}.protocol",
        f"{cfg.protocol!r} is a grid over a ViT's blocks and patch tokens; model.arch={config.model.arch!r} has one "
        "pooled feature: use protocol 'dino' (DINO's eval_linear.py on a ResNet) or 'frozen'",
      )
      grid = tuple(r["n_last_blocks_grid"])
      require(
        max(grid) <= depth,
        f"{field}.n_last_blocks_grid",
        f"{grid} (the protocol's when ()) needs {max(grid)} blocks, the backbone has {depth}: give a smaller grid",
      )
    else:
      require(
        r["n_last_blocks"] <= depth,
        f"{field}.n_last_blocks",
        f"0 means the protocol's {r['n_last_blocks']} blocks, the backbone has {depth}: give n_last_blocks",
      )
