"""io/restore.py, the read-only side of checkpoints: ``config.init_from`` reads every weights file load_backbone
reads (official PyTorch layout included), and a model change under ``config.resume`` or a workdir resume is named by
the config fields that differ, in one line, instead of orbax's tree-structure / array-shape messages.

One checkpoint of the tiny config at initialisation (no step compiled) is made per module; its teacher, taken from
the state the trainer saved (not read back through restore.py), is the reference.
"""

import os
import shutil
import sys

import jax
import numpy as np
import pytest
from conftest import checkpoint_at_init, make_tiny_config

from simdino_jax import export
from simdino_jax.errors import CheckpointMismatchError, ResumeError
from simdino_jax.io import formats
from simdino_jax.train import trainer
from simdino_jax.tree import named_leaves


def host(tree) -> dict:
  return {k: np.asarray(v) for k, v in named_leaves(jax.device_get(tree)).items()}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """(workdir, {teacher name: array}) of a checkpoint of step 0 of the tiny config with seed 7."""
  workdir = tmp_path_factory.mktemp("restore_source")
  config = make_tiny_config()
  config.seed = 7
  _, state = checkpoint_at_init(config, str(workdir))
  return workdir, host(state.teacher)


def restore_or_init(config, workdir):
  tr = trainer.Trainer(config, str(workdir))
  with tr.checkpointer() as ckpt:
    return tr, *tr.restore_or_init(ckpt)


@pytest.mark.parametrize("container", ["safetensors", "npz"])
def test_init_from_a_torch_layout_export_loads_its_backbone(source, tmp_path, monkeypatch, container):
  workdir, teacher = source
  monkeypatch.setitem(sys.modules, "torch", None)  # the .safetensors / .npz containers need no PyTorch
  path = str(tmp_path / f"vit_torch.{container}")
  export.export(str(workdir), path, fmt="torch")
  assert "blocks.0.attn.qkv.weight" in formats.load_arrays(path)  # official names and layout in the file
  config = make_tiny_config()  # seed 0: its own initialisation differs from the source's
  config.init_from = path
  _, state, step = restore_or_init(config, tmp_path / "run")
  got = host(state)
  assert step == 0
  backbone = sorted(k for k in teacher if k.startswith("backbone/"))
  assert len(backbone) > 10
  for which in ("student", "teacher"):
    for name in backbone:
      np.testing.assert_array_equal(got[f"{which}/{name}"], teacher[name], err_msg=f"{which}/{name}")
  # (this run's seed 0 initialises other values than the source's seed 7: equality means loaded)


def test_resume_from_a_weights_file_points_to_init_from(source, tmp_path):
  workdir, _ = source
  path = str(tmp_path / "vit.npz")
  export.export(str(workdir), path)
  config = make_tiny_config()
  config.resume = path
  with pytest.raises(ResumeError, match=r"config.resume: .*vit.npz is a file; .*config.init_from") as e:
    restore_or_init(config, tmp_path / "run")
  assert "\n" not in str(e.value)


def _assert_names_the_fields(message: str, *fields: str) -> None:
  assert "\n" not in message
  for field in fields:
    assert field in message, message
  for orbax_words in ("tree structures", "strict=False", "ArrayRestoreArgs", "Truncating"):
    assert orbax_words not in message, message


@pytest.mark.parametrize("field,value,old", [("depth", 3, 2), ("embed_dim", 48, 32)])
def test_a_model_change_under_resume_names_the_config_fields(source, tmp_path, field, value, old):
  workdir, _ = source
  config = make_tiny_config()
  config.model[field] = value
  config.total_steps = 9  # differs too, but cannot make a restore fail: not listed
  config.resume = str(workdir)
  with pytest.raises(CheckpointMismatchError, match="^config.resume: ") as e:
    restore_or_init(config, tmp_path / "run")
  _assert_names_the_fields(str(e.value), f"config.model.{field}: checkpoint {old}, this run {value}")
  assert "total_steps" not in str(e.value) and "config.seed" not in str(e.value)


def test_a_model_change_in_a_resumed_workdir_names_the_config_fields(source, tmp_path):
  workdir, _ = source
  shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
  config = make_tiny_config()
  config.seed = 7
  config.model.embed_dim, config.model.num_heads = 48, 3
  with pytest.raises(CheckpointMismatchError) as e:
    restore_or_init(config, tmp_path)
  _assert_names_the_fields(
    str(e.value),
    "config.model.embed_dim: checkpoint 32, this run 48",
    "config.model.num_heads: checkpoint 2, this run 3",
  )
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["0"]  # refused, not moved aside as unusable
