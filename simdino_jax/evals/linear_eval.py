"""The linear evaluation plug-in (``type="linear"``): one of two protocols on the frozen backbone.

``protocol="frozen"`` (evals/linear.py): features extracted once with the round's shared pass, standardised, an lr
sweep in one program; fast, for small data. ``protocol="dino"`` (evals/linear_dino.py): DINO's eval_linear.py,
RandomResizedCrop + flip views re-drawn every epoch through the frozen backbone; the ImageNet recipes' choice.
DIR/eval/NAME.json holds ``accuracy`` (the best lr's top-1), ``lr``, ``per_lr``, ``protocol``, ``epochs`` and the
feature choice (cls of the last ``n_last_blocks`` blocks, + the average patch token with ``avgpool``).
"""

from __future__ import annotations

import concurrent.futures

import jax

from simdino_jax.evals import linear, linear_dino, runner

PROTOCOLS = ("frozen", "dino")


class LinearEvaluator(runner.Evaluator):
  """Linear classifiers on frozen features, an lr sweep; see the module docstring for the two protocols."""

  # protocol "frozen": lrs used as given; "dino": lrs per 256 images (x batch_size / 256), cosine per epoch, best
  # epoch reported; crop_size 0: the eval image size; resize_size 0: round(crop x 256 / 224) (ImageNet: 224 / 256).
  DEFAULTS = dict(
    protocol="frozen",
    n_last_blocks=1,
    avgpool=False,
    lrs=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
    epochs=100,
    batch_size=256,
    crop_size=0,
    resize_size=0,
  )
  init_keys = ("accuracy",)

  @property
  def spec(self) -> tuple:
    return ("linear", self.cfg.n_last_blocks, bool(self.cfg.avgpool))

  def feature_specs(self) -> tuple:
    return (self.spec,) if self.cfg.protocol == "frozen" else ()  # "dino" re-draws views every epoch

  def run(self, ctx, params, feats) -> dict:
    c = self.cfg
    what = f"cls of the last {c.n_last_blocks} block(s)" + (" + avg-pooled patch tokens" if c.avgpool else "")
    common = dict(protocol=c.protocol, features=what, n_last_blocks=c.n_last_blocks, avgpool=c.avgpool)
    if c.protocol == "dino":
      return dict(self._dino(ctx, params), **common)
    key = runner.spec_key(self.spec)
    (train_f, train_y), (test_f, test_y) = feats["train"], feats["test"]
    result = linear.linear_probe(
      train_f[key],
      train_y,
      test_f[key],
      test_y,
      num_classes=ctx.num_classes,
      lrs=tuple(c.lrs),
      epochs=c.epochs,
      batch_size=c.batch_size,
      seed=self.config.seed,
    )
    return dict(result, **common)

  def _dino(self, ctx, params) -> dict:
    """DINO's protocol: per epoch, fresh RandomResizedCrop + flip views of the training set (host threads) through
    the frozen backbone and every lr's classifier (one jitted step, batch split over the devices); validation each
    epoch on the test set's resize + centre-crop features, extracted once."""
    c, config = self.cfg, self.config
    train_src, test_src = ctx.train_source, ctx.test_source
    crop, resize_to = linear_dino.resolve_sizes(c.crop_size, c.resize_size, ctx.image_size)
    key = runner.spec_key(self.spec)
    raw = runner.make_feature_fn(ctx.graphdef, (self.spec,))
    test_f, test_y = ctx.extract(
      params,
      test_src,
      ctx.backbone_fn(("features", (self.spec,)), raw),
      image_size=crop,
      transform=lambda image: linear_dino.eval_view(image, crop, resize_to),
    )
    b, r = ctx.batch_sharding, ctx.replicated
    step = ctx.compiled(
      ("linear_dino_step", self.spec),
      lambda: jax.jit(
        linear_dino.make_train_step(raw, key),
        donate_argnums=0,
        in_shardings=(r, ctx.param_sharding, b, b, b, r),
        out_shardings=(r, r),
      ),
    )
    n_dev, n_proc = jax.device_count(), jax.process_count()
    # Slots per step: the batch, or fewer when the whole training set is smaller (a tiny dataset would otherwise
    # push mostly padding through the backbone); a multiple of the devices either way. The lr scales with the
    # configured batch, as DINO's does.
    slots = min(c.batch_size, -(-len(train_src) // n_dev) * n_dev)
    ctx.log(
      f"linear (dino): {len(train_src)} train / {len(test_src)} test images, crop {crop} (eval: resize "
      f"{resize_to} + centre crop), batch {c.batch_size}, {c.epochs} epochs, {len(c.lrs)} lrs"
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
        lrs=tuple(c.lrs),
        batch_size=c.batch_size,
        epochs=c.epochs,
        seed=config.seed,
        num_train=len(train_src),
        log=ctx.log,
      )
    return dict(result, crop_size=crop, resize_size=resize_to)

  def metrics(self, result: dict) -> dict:
    return {"top1": result["accuracy"], "top5": result["top5"], "lr": result["lr"]}

  def summary(self, r: dict) -> str:
    return (
      f"top-1 {r['accuracy']:.2f}% at lr {r['lr']:g} (best of {len(r['per_lr'])} lrs, {r['epochs']} epochs, "
      f"protocol {r['protocol']})"
    )

  @classmethod
  def validate(cls, cfg, field, *, config, patch, depth, num_devices) -> None:
    require = runner.require
    require(
      len(cfg.lrs) > 0 and all(lr > 0 for lr in cfg.lrs),
      f"{field}.lrs",
      f"must be a non-empty tuple of positive learning rates, got {cfg.lrs!r}",
    )
    require(isinstance(cfg.epochs, int) and cfg.epochs >= 1, f"{field}.epochs", f"must be >= 1, got {cfg.epochs!r}")
    require(cfg.batch_size >= 1, f"{field}.batch_size", f"must be >= 1, got {cfg.batch_size}")
    require(
      1 <= cfg.n_last_blocks <= depth,
      f"{field}.n_last_blocks",
      f"must be in [1, depth={depth}], got {cfg.n_last_blocks}",
    )
    require(
      cfg.protocol in PROTOCOLS,
      f"{field}.protocol",
      f"must be 'frozen' (cached features) or 'dino' (DINO's eval_linear.py), got {cfg.protocol!r}",
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
    if cfg.protocol == "dino":
      require(
        cfg.batch_size % num_devices == 0,
        f"{field}.batch_size",
        f"{cfg.batch_size} is not divisible by the {num_devices} devices (protocol 'dino' splits it over them)",
      )
