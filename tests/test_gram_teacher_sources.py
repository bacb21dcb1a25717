"""config.gram.teacher (train/gram.py): the first Gram teacher from a checkpoint, DINOv3's ``gram.ckpt``.

What is checked against DINOv3 (``ssl_meta_arch.py`` ``init_weights`` / ``get_gram_teacher_output``, ``train.py``'s
``it_load_ema_teacher`` and "[GRAM] Update gram teacher" blocks): the loaded backbone is the Gram teacher of
iteration 0 (its Gram loss, against the NumPy transcription of GramLoss.forward in tests/test_gram.py, with the
weight on although ``start_step`` > 0: the load initialises it), the EMA teacher replaces it before
``it_load_ema_teacher`` (``start_step``) and at the refreshes, never otherwise; the sources (a workdir of ours, an
export of ours, an official state dict) give the same backbone; another architecture is refused in one line naming
the field. The exact resume (the restored Gram teacher, not a reload) is tests/test_resume_beyond.py's gram run, whose
Gram teacher comes from such a file moved away before the resume.
"""

import json

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
  config = tiny(True, **SCHEDULE)
  backbone = source_backbone(config)
  config.gram.teacher = export(tmp_path_factory.mktemp("gram_source") / "backbone.npz", backbone, config)
  setup, state, step = built(config)
  assert setup.gram.preloaded
  shardings = setup_lib.state_sharding(setup, sharding.make_mesh(config.mesh))
  return setup, gram_lib.fill(setup, state, shardings, log=lambda _: None), step, backbone


def test_iteration_0_anchors_to_the_loaded_backbone_with_the_weight_on(loaded):
  setup, state, step, backbone = loaded
  gram = named_leaves(state.gram_teacher)
  assert gram.keys() == backbone.keys()
  for name, value in backbone.items():
    np.testing.assert_array_equal(np.asarray(gram[name]), value, err_msg=name)
  b = batch(setup.config, 0)
  _, metrics = step(state, b)
  net = setup.backbone_graphdef
  forward = jax.jit(lambda params, images, masks: nnx.merge(net, params)(images, masks=masks)["patch"])
  images, masks = b["global"].reshape((-1,) + b["global"].shape[2:]), b["mask"].reshape(-1, b["mask"].shape[-1])
  student = np.asarray(forward(state.student["backbone"], images, masks), np.float64)  # masked crops
  teacher = np.asarray(forward(state.gram_teacher, images, jnp.zeros_like(masks)), np.float64)  # the loaded one
  assert float(metrics["gram_weight"]) == pytest.approx(WEIGHT)  # start_step 2: on all the same (initialised)
  np.testing.assert_allclose(float(metrics["gram_loss"]), np_gram_loss(student, teacher, img_level=True), rtol=1e-4)


def test_the_ema_teacher_replaces_it_at_it_load_ema_teacher_and_the_refreshes_only(loaded):
  setup, state, step, backbone = loaded
  for it, takes_ema in enumerate(TAKES_EMA):
    gram_before, teacher_before = leaves(state.gram_teacher), leaves(state.teacher["backbone"])
    state, _ = step(state, batch(setup.config, it))
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
