"""The fine-tuning evaluator (evals/finetune.py) against the official recipe's pieces, transcribed in NumPy from iBOT's
evaluation/classification_layer_decay (optim_factory.py get_num_layer_for_vit + get_parameter_groups, torch AdamW
with lr_scale) and timm's LabelSmoothingCrossEntropy; then one fine-tune of a tiny ViT end to end: it separates
synthetic classes, a stopped fine-tune resumes bitwise, and its failure leaves the other evaluators' results."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from PIL import Image

from simdino_jax import evals, sharding
from simdino_jax.data import augment, sources
from simdino_jax.errors import ConfigError
from simdino_jax.evals import finetune, runner
from simdino_jax.io import checkpointing
from simdino_jax.models.network import backbone_kwargs, build_backbone
from simdino_jax.train import metrics
from simdino_jax.tree import named_leaves


# -- NumPy transcriptions of the official code -------------------------------------------------------------------------
def ibot_num_layer_for_vit(var_name, num_max_layer):  # optim_factory.py:32-43
  if var_name in ("cls_token", "mask_token", "pos_embed"):
    return 0
  elif var_name.startswith("patch_embed"):
    return 0
  elif var_name.startswith("rel_pos_bias"):
    return num_max_layer - 1
  elif var_name.startswith("blocks"):
    return int(var_name.split(".")[1]) + 1
  else:
    return num_max_layer - 1


def ibot_param_groups(shapes, weight_decay, skip_list, layer_decay, num_layers):
  """{torch name: (weight_decay, lr_scale)} as get_parameter_groups (optim_factory.py:77-116) with the
  LayerDecayValueAssigner of run_class_finetuning.py:552."""
  values = [layer_decay ** (num_layers + 1 - i) for i in range(num_layers + 2)]
  out = {}
  for name, shape in shapes.items():
    wd = 0.0 if (len(shape) == 1 or name.endswith(".bias") or name in skip_list) else weight_decay
    out[name] = (wd, values[ibot_num_layer_for_vit(name, len(values))])
  return out


def torch_name(name: str) -> str:
  """Our leaf name -> the official model's parameter name (head and fc_norm sit at the top, as in BEiT's model)."""
  name = name.removeprefix("backbone/").replace("/", ".")
  for ours, theirs in ((".kernel", ".weight"), (".scale", ".weight")):
    if name.endswith(ours):
      name = name[: -len(ours)] + theirs
  return name


def timm_label_smoothing_ce(x, target, smoothing):  # timm/loss/cross_entropy.py LabelSmoothingCrossEntropy.forward
  logprobs = x - np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1, keepdims=True)) - x.max(-1, keepdims=True)
  nll_loss = -np.take_along_axis(logprobs, target[:, None], axis=-1)[:, 0]
  smooth_loss = -logprobs.mean(axis=-1)
  return np.mean((1.0 - smoothing) * nll_loss + smoothing * smooth_loss)


# -- fixtures ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def data(tmp_path):
  """2 classes, 16x16 px: horizontal vs vertical stripes of period 4, random phase and contrast, on noise. A
  random-init backbone's frozen features separate them only partly (the frozen linear probe: 89.58%); fine-tuning
  learns them (100%)."""
  rng = np.random.default_rng(0)

  def split(n):
    labels = np.arange(n) % 2
    images = rng.integers(0, 60, (n, 16, 16, 3))
    for i in range(n):
      on = (np.arange(16) + rng.integers(0, 4)) % 4 < 2
      contrast = rng.integers(100, 190)
      if labels[i]:
        images[i, on, :] += contrast
      else:
        images[i, :, on] += contrast
    return images.astype(np.uint8), labels.astype(np.int64)

  (tr, trl), (te, tel) = split(96), split(48)
  path = tmp_path / "sep.npz"
  np.savez(path, train_images=tr, train_labels=trl, test_images=te, test_labels=tel)
  return f"npz:{path}"


def make_context(config, out_dir, *, tools=True):
  graphdef, state = nnx.split(nnx.jit(lambda: build_backbone(config.model, rngs=nnx.Rngs(0)))())
  mesh = sharding.make_mesh(config.mesh)
  ctx = runner.Context(
    config,
    graphdef=graphdef,
    param_sharding=jax.tree.map(lambda _: sharding.replicated(mesh), state),
    mesh=mesh,
    train_source=sources.load_source(config.data.source, "train"),
    test_source=sources.load_source(config.data.source, "test"),
    out_dir=str(out_dir),
    log=lambda msg: None,
    checkpointer=checkpointing.Checkpointer if tools else None,
    metrics_log=metrics.MetricsLog if tools else None,
  )
  return ctx, state


def finetune_config(tiny_config, data, **fields):
  c = tiny_config
  c.data.source = data
  c.model.drop_path_rate = 0.0
  # The recipe's random erasing and mixup / cutmix run in the step; RandAugment (host-side, tested in
  # tests/test_randaugment.py) is off to keep the test short.
  base = dict(
    lr=3e-3,
    epochs=30,
    batch_size=32,
    warmup_epochs=3,
    layer_decay=0.75,
    drop_path=0.1,
    eval_every=15,
    log_every=25,
    auto_augment="none",
  )
  c.evals = {"finetune": evals.declare("finetune", **{**base, **fields})}
  return c


# -- the recipe's pieces -----------------------------------------------------------------------------------------------
def test_adamw_step_follows_ibot_layer_decay_groups(tiny_config):
  """One AdamW step with gradient 1 everywhere moves each leaf by -lr x lr_scale x (1 / (1 + eps) + wd x w): the
  official group's lr_scale and weight decay, per leaf (head and the unused mask token included)."""
  cfg = tiny_config
  kw = backbone_kwargs(cfg.model)
  backbone = nnx.state(build_backbone(cfg.model, rngs=nnx.Rngs(0)))
  head = finetune.init_head(jax.random.key(1), kw["embed_dim"], 5, init_scale=1.0, pooling="mean")
  params = {"backbone": backbone, **head}
  r = finetune.resolve(evals.declare("finetune", layer_decay=0.65), kw["embed_dim"])
  lr = 0.01
  tx = finetune.finetune_optimizer(params, r=r, lrs=np.full((3,), lr, np.float32), depth=kw["depth"])
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  leaves, moved = named_leaves(params), named_leaves(updates)
  shapes = {torch_name(n): np.shape(x) for n, x in leaves.items() if n != "backbone/mask_token"}
  groups = ibot_param_groups(shapes, 0.05, {"pos_embed", "cls_token"}, 0.65, kw["depth"])
  assert {torch_name(n) for n in leaves} - set(groups) == {"mask_token"}
  assert groups["head.weight"][1] == 1.0 and groups["blocks.0.attn.qkv.weight"][1] == 0.65**2  # depth 2
  assert groups["pos_embed"] == (0.0, 0.65**3) and groups["fc_norm.weight"] == (0.0, 1.0)
  for name, x in leaves.items():
    # The mask token (not in the official model, unused: its gradient is 0 in training) is never decayed.
    wd, scale = (0.0, 0.65**3) if name == "backbone/mask_token" else groups[torch_name(name)]
    want = -lr * scale * (1.0 / (1.0 + 1e-8) + wd * np.asarray(x, np.float64))
    np.testing.assert_allclose(moved[name], want, rtol=1e-5, atol=1e-9, err_msg=name)


def test_label_smoothing_matches_timm():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(7, 11)).astype(np.float32) * 3
  y = rng.integers(0, 11, 7)
  for s in (0.0, 0.1, 0.3):
    got = finetune.label_smoothing_ce(jnp.asarray(x), jnp.asarray(y), s)
    np.testing.assert_allclose(float(got), timm_label_smoothing_ce(x.astype(np.float64), y, s), rtol=1e-6)


def test_schedules_follow_the_official_schedulers():
  """BEiT's utils.cosine_scheduler (per iteration) and timm's per-epoch cosine as DeiT's loop steps it."""
  v = finetune.beit_cosine(1.0, 0.1, epochs=4, niter_per_ep=3, warmup_epochs=1)
  np.testing.assert_allclose(v[:3], [0.0, 0.5, 1.0])
  iters = np.arange(9)
  np.testing.assert_allclose(v[3:], 0.1 + 0.45 * (1 + np.cos(np.pi * iters / 9)))

  # timm CosineLRScheduler(t_initial=10, lr_min=0.1, warmup_t=2, warmup_lr_init=0.01): set at construction, then
  # step(e) after epoch e; transcribed from timm/scheduler/cosine_lr.py _get_lr (warmup_prefix False, 1 cycle).
  def timm_get_lr(t):
    if t < 2:
      return 0.01 + t * (1.0 - 0.01) / 2
    return 0.1 + 0.5 * (1.0 - 0.1) * (1 + np.cos(np.pi * t / 10))

  trained = [0.01] + [timm_get_lr(e) for e in range(9)]  # epoch 0 at warmup_lr_init, epoch e + 1 at lr(e)
  got = [finetune.timm_epoch_lr(e, 1.0, 0.1, 10, 2, 0.01) for e in range(10)]
  np.testing.assert_allclose(got, trained)


def test_recipe_values_follow_the_size_and_yield_to_set_fields():
  """BEiT's per-size rows from the width (S <= 384 < B <= 768 < L) or ``size``; a field given explicitly wins."""
  s, b = finetune.resolve(evals.declare("finetune"), 384), finetune.resolve(evals.declare("finetune"), 768)
  assert (s["epochs"], s["layer_decay"], s["drop_path"], s["warmup_epochs"]) == (200, 0.75, 0.1, 20)
  assert (b["epochs"], b["layer_decay"], b["drop_path"], b["lr"], b["batch_size"]) == (100, 0.65, 0.2, 4e-3, 1024)
  forced = finetune.resolve(evals.declare("finetune", size="L", epochs=3), 96)
  assert (forced["epochs"], forced["drop_path"], forced["warmup_epochs"]) == (3, 0.4, 5)
  deit = finetune.resolve(evals.declare("finetune", recipe="deit"), 768)
  assert (deit["epochs"], deit["lr"], deit["lr_scaling"], deit["layer_decay"], deit["schedule"]) == (
    1000,
    7.5e-6,
    "linear_512",
    1.0,
    "per_epoch",
  )


def test_bad_fields_are_refused_naming_the_field(tiny_config):
  cfg = tiny_config
  for fields, match in (
    (dict(auto_augment="rand-x9"), r"^config\.evals\.finetune\.auto_augment: unknown RandAugment section"),
    (dict(batch_size=33), r"^config\.evals\.finetune\.batch_size: mixup / cutmix pair .* 33 is odd"),
    (dict(recipe="mae"), r"^config\.evals\.finetune\.recipe: must be one of"),
    (dict(crop_padding=-2), r"^config\.evals\.finetune\.crop_padding: must be >= 0 or -1"),
  ):
    cfg.evals = {"finetune": evals.declare("finetune", **fields)}
    with pytest.raises(ConfigError, match=match):
      evals.validate(cfg, patch=4, depth=2, num_devices=1)


def test_soft_target_ce_matches_timm():
  """timm SoftTargetCrossEntropy: sum(-target * log_softmax(x), -1).mean()."""
  rng = np.random.default_rng(1)
  x, t = rng.normal(size=(6, 5)), rng.dirichlet(np.ones(5), size=6)
  logp = x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
  want = np.mean(np.sum(-t * logp, axis=-1))
  np.testing.assert_allclose(float(finetune.soft_target_ce(jnp.asarray(x), jnp.asarray(t))), want, rtol=1e-6)


def test_step0_features_are_the_frozen_probes_and_views_follow_each_script(tiny_config):
  """At step 0 the fine-tuned model reads exactly the frozen linear probe's feature (the final-normed cls token of
  the same weights, deterministic at validation although the model has drop path). Validation views above 32 px:
  BEiT's Resize(int(S / (224 / 256)), interpolation=2 = PIL BILINEAR) + CenterCrop (rcf.py:281-289), DeiT's
  Resize(int(256 / 224 x S), bicubic) (eval_cls.py:337-341): transcribed with PIL as torchvision resizes a PIL image
  (shorter side to the size, the longer one truncated) and centre-crops it."""
  cfg = tiny_config
  kw = backbone_kwargs(cfg.model)
  graphdef = nnx.split(
    nnx.eval_shape(lambda: finetune.VisionTransformer(**dict(kw, drop_path_rate=0.3), rngs=nnx.Rngs(0)))
  )[0]
  head = {"head": {"kernel": jnp.eye(kw["embed_dim"]), "bias": jnp.zeros((kw["embed_dim"],))}}
  spec = ("linear", 1, False)  # evals.linear's "frozen" feature
  logits_fn = finetune.make_logits_fn(graphdef, "cls")
  probe_fn = runner.make_feature_fn(runner.eval_graphdef(kw, "float32"), [spec])

  def both(images):  # one program: the weights, the fine-tune's logits through an identity head, the probe's feature
    backbone = nnx.state(build_backbone(cfg.model, rngs=nnx.Rngs(0)))
    return logits_fn({"backbone": backbone, **head}, images, None), probe_fn(backbone, images)[runner.spec_key(spec)]

  got, want = jax.jit(both)(jax.random.normal(jax.random.key(0), (4, 16, 16, 3)))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)

  image = np.random.default_rng(0).integers(0, 256, (40, 48, 3)).astype(np.uint8)  # h 40, w 48
  for bilinear, short, resample in ((True, int(36 / (224 / 256)), Image.BILINEAR), (False, int(256 / 224 * 36), 3)):
    resized = np.asarray(Image.fromarray(image).resize((int(short * 48 / 40), short), resample))
    top, left = int(round((resized.shape[0] - 36) / 2.0)), int(round((resized.shape[1] - 36) / 2.0))
    want = augment.normalize(resized[top : top + 36, left : left + 36])
    np.testing.assert_allclose(finetune.eval_view(image, 36, bilinear), want, atol=1e-6, err_msg=str(bilinear))


# -- end to end --------------------------------------------------------------------------------------------------------
def _state_arrays(directory, step):
  return named_leaves(ocp.StandardCheckpointer().restore(directory / "checkpoints" / str(step) / "state"))


def test_finetune_beats_the_frozen_probe_resumes_bitwise_and_writes_its_files(tiny_config, data, tmp_path):
  """Random-init tiny ViT on the stripes, where its frozen features are weak: the frozen linear probe (the linear
  evaluator's "frozen" protocol) scores 89.58%, 30 epochs of 3 fine-tuning steps (erasing, mixup / cutmix, drop
  path on) 77.08% at epoch 15 and 100% at the end (measured; with the backbone kept frozen, layer_decay 0.001, the
  same fine-tune: 54.17% / 50.00%). A fine-tune stopped after 7 steps and run again ends with the same bits as an
  uninterrupted one."""
  config = finetune_config(tiny_config, data)
  config.evals["linear"] = evals.declare("linear")
  ctx, backbone = make_context(config, tmp_path / "a")
  built = evals.build(config, ["linear", "finetune"])
  ev = built["finetune"]
  results = runner.run_round(ctx, built, backbone)
  probe, result = results["linear"]["accuracy"], results["finetune"]
  assert result["top1"] >= 95.0 and result["top1"] >= probe + 5.0 and result["accuracy"] == result["top1"]
  assert result["lr"] == 3e-3 and result["recipe"]["layer_decay"] == 0.75 and result["recipe"]["recipe"] == "beit"
  lr_dir = tmp_path / "a" / "finetune" / "lr0.003"
  history = json.loads((lr_dir / "validations.json").read_text())
  assert [h["step"] for h in history] == [45, 90] and history[-1]["top1"] == result["last"]["top1"]
  logged = [json.loads(line) for line in (lr_dir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in logged] == [25, 45, 50, 75, 90] and "val_top1" in logged[-1]
  assert list((lr_dir / "tensorboard").iterdir()) and (lr_dir / "curves.png").exists()

  ctx_b = ctx  # the same context (its compiled step), another directory
  ctx_b.out_dir = str(tmp_path / "b")
  ev.stop_after_steps = 7
  with pytest.raises(finetune.FinetuneStopped) as stopped:
    ev.run(ctx_b, backbone, None)
  assert stopped.value.code == finetune.STOP_EXIT_CODE and "step 7/90" in str(stopped.value)
  ev.stop_after_steps = None
  resumed = ev.run(ctx_b, backbone, None)
  assert resumed["per_lr"]["0.003"]["validations"] == result["per_lr"]["0.003"]["validations"]
  a, b = _state_arrays(lr_dir, 90), _state_arrays(tmp_path / "b" / "finetune" / "lr0.003", 90)
  assert a.keys() == b.keys() and len(a) > 20
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  b_dir = tmp_path / "b" / "finetune" / "lr0.003" / "checkpoints"
  steps = sorted(p.name for p in b_dir.iterdir())
  again = ev.run(ctx_b, backbone, None)  # finished: restored, nothing trained again, the same result
  assert sorted(p.name for p in b_dir.iterdir()) == steps
  assert again["per_lr"]["0.003"]["validations"] == resumed["per_lr"]["0.003"]["validations"]


def test_a_failing_finetune_keeps_the_other_results(tiny_config, data, tmp_path):
  config = finetune_config(tiny_config, data, epochs=6, warmup_epochs=7)  # more warm-up than epochs: refused at run
  config.evals["knn"] = evals.declare("knn")
  ctx, backbone = make_context(config, tmp_path)
  failed = {}
  results = runner.run_round(ctx, evals.build(config, ["knn", "finetune"]), backbone, failed=failed)
  assert set(results) == {"knn"} and results["knn"]["accuracy"] > 0
  assert isinstance(failed["finetune"], ConfigError)
  assert str(failed["finetune"]).startswith("config.evals.finetune.warmup_epochs: 7 warm-up epochs")
  bare, _ = make_context(config, tmp_path, tools=False)  # a context without the entry points' checkpointer
  with pytest.raises(ConfigError, match=r"^config\.evals\.finetune: fine-tuning needs the checkpointer"):
    evals.build(config)["finetune"].run(bare, backbone, None)
