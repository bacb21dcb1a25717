"""config.gram.teacher (train/gram.py): the first Gram teacher from a checkpoint, DINOv3's ``gram.ckpt``.

What is checked against DINOv3 (``ssl_meta_arch.py`` ``init_weights`` / ``get_gram_teacher_output``, ``train.py``'s
``it_load_ema_teacher`` and "[GRAM] Update gram teacher" blocks): the loaded backbone is the Gram teacher of
iteration 0 (its Gram loss, against the NumPy transcription of GramLoss.forward in tests/test_gram.py, with the
weight on although ``start_step`` > 0: the load initialises it; on its own larger crops, below: one step compiled
for both), the EMA teacher replaces it before ``it_load_ema_teacher`` (``start_step``) and at the refreshes, never
otherwise; the sources (a workdir of ours, an export of ours, an official state dict) give the same backbone;
another architecture is refused in one line naming the field. The exact resume (the restored Gram teacher, not a
reload) is tests/test_resume_beyond.py's gram run, whose Gram teacher comes from such a file moved away before the
resume.

And the high-resolution Gram teacher (config.gram.crop_size, DINOv3's crops.gram_teacher_crops_size): the resize of
its patch features against torch's F.interpolate (values recorded with torch 2.13 CPU), the data pipeline's crops
(the global crops' boxes and flips at the larger size, undistorted, nothing else changed), and the step's Gram loss
against NumPy (a per-pixel transcription of torch's upsample_bicubic2d and GramLoss.forward) on those crops (the
iteration-0 test above).
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_distill import network
from test_gram import np_gram_loss
from test_gram_step import WEIGHT, batch, built, leaves, tiny

from simdino_jax import config as config_lib
from simdino_jax import sharding
from simdino_jax.data import augment
from simdino_jax.data.multicrop import MultiCrop, MultiCropConfig
from simdino_jax.errors import ConfigError
from simdino_jax.io import checkpointing, formats, torch_interop
from simdino_jax.train import gram as gram_lib
from simdino_jax.train import setup as setup_lib
from simdino_jax.tree import named_leaves

# The loaded teacher at iterations 0 and 1; the EMA teacher loaded before iteration 2 (it_load_ema_teacher = 2);
# one refresh, after iteration 3 (it + 1 = 4 >= first 4, 4 % 2 == 0), none after 5 (max 1).
SCHEDULE = dict(start_step=2, first_refresh=4, refresh_every=2, max_refreshes=1)
TAKES_EMA = [False, False, True, False, True, False]  # the Gram teacher iteration it uses is the EMA teacher's


def source_backbone(config, seed=3):
  """{name: array} of a generic backbone of ``config``'s architecture (names without backbone/)."""
  variables = network(config, seed)[1]
  return {k: np.asarray(v) for k, v in named_leaves(variables["backbone"]).items()}


def export(path, backbone, config, layout="flax"):
  """An export of ours (formats.save_npz with its metadata, as simdino_jax.export writes) or, ``layout="torch"``,
  an official state dict (torch_interop.to_torch: DINOv2's names and layout, no config)."""
  if layout == "torch":
    formats.save_npz(torch_interop.to_torch({f"backbone/{k}": v for k, v in backbone.items()}), str(path))
  else:
    metadata = {"format": "simdino_jax", "layout": "flax", "config": json.dumps(checkpointing.config_dict(config))}
    formats.save_npz({f"backbone/{k}": v for k, v in backbone.items()}, str(path), metadata)
  return str(path)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
  """One tiny run with both features (one step compiled): a loaded Gram teacher fed its own 24 px crops (16 px global
  crops of 4 px patches: its 6 x 6 patch grid resized to the student's 4 x 4)."""
  config = tiny(True, **SCHEDULE, crop_size=24)
  backbone = source_backbone(config)
  config.gram.teacher = export(tmp_path_factory.mktemp("gram_source") / "backbone.npz", backbone, config)
  setup, state, step = built(config)
  assert setup.gram.preloaded and setup.multicrop.gram_size == 24 and setup.gram.grid == 4
  shardings = setup_lib.state_sharding(setup, sharding.make_mesh(config.mesh))
  return setup, gram_lib.fill(setup, state, shardings, log=lambda _: None), step, backbone


def gram_batch(config, seed):
  """test_gram_step's batch with the Gram teacher's crops (random values: only their use is tested here)."""
  b = batch(config, seed)
  rng = np.random.default_rng(seed + 100)
  b["gram_global"] = jnp.asarray(rng.standard_normal((config.batch_size, 2, 24, 24, 3)), jnp.float32)
  return b


def test_iteration_0_anchors_to_the_loaded_backbone_on_its_crops_resized_with_the_weight_on(loaded):
  setup, state, step, backbone = loaded
  gram = named_leaves(state.gram_teacher)
  assert gram.keys() == backbone.keys()
  for name, value in backbone.items():
    np.testing.assert_array_equal(np.asarray(gram[name]), value, err_msg=name)
  b = gram_batch(setup.config, 0)
  _, metrics = step(state, b)
  net = setup.backbone_graphdef
  forward = jax.jit(lambda params, images, masks: nnx.merge(net, params)(images, masks=masks)["patch"])
  images, masks = b["global"].reshape((-1, 16, 16, 3)), b["mask"].reshape(-1, 16)
  student = np.asarray(forward(state.student["backbone"], images, masks), np.float64)  # masked crops
  big = b["gram_global"].reshape(-1, 24, 24, 3)
  teacher = np.asarray(forward(state.gram_teacher, big, jnp.zeros((big.shape[0], 36), bool)), np.float64)
  maps = teacher.transpose(0, 2, 1).reshape(-1, teacher.shape[2], 6, 6)  # DINOv3's (B, D, N, N)
  resized = np_bicubic(maps, 4).reshape(-1, teacher.shape[2], 16).transpose(0, 2, 1)
  assert float(metrics["gram_weight"]) == pytest.approx(WEIGHT)  # start_step 2: on all the same (initialised)
  np.testing.assert_allclose(float(metrics["gram_loss"]), np_gram_loss(student, resized, img_level=True), rtol=1e-4)
  # The student's own crops would give another target: the step read "gram_global".
  same = np_gram_loss(student, np.asarray(forward(state.gram_teacher, images, 0 * masks)), img_level=True)
  assert abs(float(metrics["gram_loss"]) - same) > 1e-3 * same


def test_the_ema_teacher_replaces_it_at_it_load_ema_teacher_and_the_refreshes_only(loaded):
  setup, state, step, backbone = loaded
  for it, takes_ema in enumerate(TAKES_EMA):
    gram_before, teacher_before = leaves(state.gram_teacher), leaves(state.teacher["backbone"])
    state, _ = step(state, gram_batch(setup.config, it))
    expected = teacher_before if takes_ema else gram_before
    after = leaves(state.gram_teacher)
    assert all(np.array_equal(a, b) for a, b in zip(after, expected, strict=True)), it
    if it < 2:  # the loaded backbone until the EMA teacher's load
      assert all(np.array_equal(a, b) for a, b in zip(after, [backbone[k] for k in sorted(backbone)])), it


def test_a_workdir_an_export_and_an_official_state_dict_give_the_same_backbone(tmp_path):
  config = tiny(True)
  backbone = source_backbone(config, seed=5)
  like = {k: np.zeros_like(v) for k, v in backbone.items()}
  variables = network(config, 5)[1]  # its EMA teacher (the heads are read and left)
  with checkpointing.Checkpointer(tmp_path / "run" / "checkpoints", async_save=False) as ckpt:
    ckpt.save(4, {"step": np.int32(4), "teacher": variables}, checkpointing.config_dict(config))
  sources = {
    "workdir": str(tmp_path / "run"),
    "checkpoint": str(tmp_path / "run" / "checkpoints" / "4"),
    "export": export(tmp_path / "ours.npz", backbone, config),
    "official": export(tmp_path / "official.npz", backbone, config, layout="torch"),
  }
  for kind, path in sources.items():
    config.gram.teacher = path
    arrays, where = gram_lib.load_backbone(config, like)
    assert arrays.keys() == backbone.keys(), kind
    for name, value in backbone.items():
      np.testing.assert_array_equal(arrays[name], value, err_msg=f"{kind} {name} ({where})")


def _refused(config, like, message):
  with pytest.raises(ConfigError) as err:
    gram_lib.load_backbone(config, like)
  text = str(err.value)
  assert text.startswith("config.gram.teacher: ") and message in text and "\n" not in text, text


def test_another_architecture_or_no_file_is_refused_in_one_line_naming_the_field(tmp_path):
  config = tiny(True)
  like = source_backbone(config)
  deeper = tiny(True)
  deeper.model.depth = 2  # same widths: every name of the student's is there, with its shape
  config.gram.teacher = export(tmp_path / "deeper.npz", source_backbone(deeper), deeper)
  _refused(config, like, "12 extra (e.g. blocks/1/")
  wider = tiny(True)
  wider.model.embed_dim = 48
  config.gram.teacher = export(tmp_path / "wider.npz", source_backbone(wider), wider)
  _refused(config, like, "in the student's backbone")
  heads = tiny(True)
  heads.model.num_heads = 4  # the same arrays: only the stored config tells
  config.gram.teacher = export(tmp_path / "heads.npz", source_backbone(heads), heads)
  _refused(config, like, "num_heads=4")
  config.gram.teacher = str(tmp_path / "absent")
  _refused(config, like, "does not exist")
  config.gram.teacher = None  # (ml_collections refuses another type)
  with pytest.raises(ConfigError, match="config.gram.teacher: must be a path"):
    config_lib.validate(config, num_devices=1)


# ---- the high-resolution Gram teacher (config.gram.crop_size) ------------------------------------------------------
# F.interpolate(x[None, None], size=(m, m), mode="bicubic", align_corners=False, antialias=aa)[0, 0] in float64 with
# torch 2.13.0+cpu, for x[a, b] = sin(1.3a + 0.7b) + 0.1ab on an n x n grid: {(n, m, aa): values}.
_TORCH = {
  (6, 4, False): [
    [0.34716958, 0.9430224016, 0.5643707877, -0.3179804921],
    [0.6992597333, -0.0295488201, -0.4480875179, 0.2149300976],
    [-0.8670113621, -0.2020067341, 1.3464145411, 2.5391970279],
    [0.1737278515, 1.6566035644, 2.2946833344, 2.1576801122],
  ],
  (6, 4, True): [
    [0.5202845132, 0.9061603907, 0.4474453199, -0.3281863749],
    [0.5592620973, 0.0145473663, -0.2649011045, 0.2513333327],
    [-0.7105899639, -0.0646312894, 1.2794660187, 2.3389527267],
    [0.1391672158, 1.5270984454, 2.2991356075, 2.2752668746],
  ],
  (8, 3, False): [
    [1.0395034456, -0.1044461099, -0.2653069453],
    [-0.6677042294, 1.906490053, 2.6885318226],
    [1.2147285103, 1.3068955955, 3.6967273324],
  ],
  (8, 3, True): [
    [0.4930099182, 0.0612340646, 0.2338113897],
    [0.0135948014, 1.4416732267, 2.3512079885],
    [0.9173959495, 1.8236516079, 3.4779890799],
  ],
}


@pytest.mark.parametrize("n, m, antialias", list(_TORCH))
def test_the_feature_resize_is_torch_bicubic_interpolate(n, m, antialias):
  a, b = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
  x = np.sin(1.3 * a + 0.7 * b) + 0.1 * a * b
  # Two feature channels (the second the negated map): (1, n*n, 2) tokens, row-major as DINOv3's unflatten.
  tokens = np.stack([x, -x], axis=-1).reshape(1, n * n, 2)
  out = np.asarray(gram_lib.resize_patches(jnp.asarray(tokens, jnp.float32), m, antialias=antialias))
  np.testing.assert_allclose(out[0, :, 0].reshape(m, m), _TORCH[n, m, antialias], atol=1e-5)
  np.testing.assert_allclose(out[0, :, 1].reshape(m, m), -np.asarray(_TORCH[n, m, antialias]), atol=1e-5)


def test_gram_crops_are_the_global_boxes_and_flips_larger_and_undistorted():
  image = np.random.default_rng(0).integers(0, 256, (40, 52, 3), np.uint8)
  base = dict(global_size=16, local_size=8, num_local=2, resize="cv2")
  plain = MultiCrop(MultiCropConfig(**base)).random_map({"image": image, "label": 1}, np.random.default_rng(7))
  crops = MultiCrop(MultiCropConfig(**base, gram_size=24))
  out = crops.random_map({"image": image, "label": 1}, np.random.default_rng(7))
  for key, value in plain.items():  # no extra random draw: every other output is the same
    np.testing.assert_array_equal(out[key], value, err_msg=key)
  params = crops.sample_params(np.random.default_rng(7), *image.shape[:2])[:2]
  assert out["gram_global"].shape == (2, 24, 24, 3) and any(p.flip for p in params) and any(p.jitter for p in params)
  for p in params:
    want = augment.apply_resized_crop(image, p.box, 24, "cv2")
    np.testing.assert_array_equal(out["gram_global"][p.index], augment.normalize(want[:, ::-1] if p.flip else want))
  with pytest.raises(ValueError, match="gram_size"):
    MultiCropConfig(**base, gram_size=24, augment_mode="device")


def np_bicubic(x, size):
  """torch's upsample_bicubic2d (align_corners=False, no antialias) on the last two axes, output pixel by pixel:
  source coordinate scale * (i + 0.5) - 0.5, Keys kernel a = -0.75 on the 4 x 4 neighbours, indices clamped."""
  n = x.shape[-1]
  scale, a = n / size, -0.75

  def taps(i):
    src = scale * (i + 0.5) - 0.5
    base = min(math.floor(src), n - 1)
    t = min(max(src - base, 0.0), 1.0)
    w = []
    for d in (-1, 0, 1, 2):
      s = abs(d - t)
      w.append((a + 2) * s**3 - (a + 3) * s**2 + 1 if s <= 1 else a * s**3 - 5 * a * s**2 + 8 * a * s - 4 * a)
    return [min(max(base + d, 0), n - 1) for d in (-1, 0, 1, 2)], w

  out = np.zeros(x.shape[:-2] + (size, size))
  for i in range(size):
    ri, wi = taps(i)
    for j in range(size):
      rj, wj = taps(j)
      for r, u in zip(ri, wi):
        for c, v in zip(rj, wj):
          out[..., i, j] += u * v * x[..., r, c]
  return out


@pytest.mark.parametrize(
  "fields, message",
  [
    ({"crop_size": 22}, "config.gram.crop_size: must be 0 or a positive multiple of the patch size 4"),
    ({"crop_size": 24, "augment_mode": "device"}, "config.gram.crop_size: the Gram teacher's crops are built in"),
  ],
)
def test_bad_gram_crop_fields_are_named(fields, message):
  config = tiny(True)
  config.data.augment_mode = fields.pop("augment_mode", "host")
  config.gram.update(fields)
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(config, num_devices=1)
