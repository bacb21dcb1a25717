"""Export: a 2-step CLI run's checkpoint -> safetensors / npz files whose arrays equal the checkpoint's parameters
exactly; the safetensors file parses with a reader written here from the format's specification and with the
``safetensors`` package's NumPy API; clear errors naming the path.

The training run shares its persistent XLA compilation cache with tests/test_launch.py's notebook run (same
command-line overrides), so whichever runs second compiles nothing.
"""

import json
import os
import struct
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import safetensors.numpy

from simdino_jax import export
from simdino_jax.errors import ExportError
from simdino_jax.io import checkpointing, formats, restore
from simdino_jax.train import trainer
from simdino_jax.tree import named_leaves

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# configs/demo.py scaled down to 2 steps (the same overrides as launch/colab.ipynb's SIMDINO_COLAB_TINY mode).
OVERRIDES = {
  "total_steps": 2,
  "checkpoint_every": 2,
  "warmup_steps": 1,
  "log_every": 1,
  "batch_size": 8,
  "model.depth": 1,
  "model.embed_dim": 24,
  "head.hidden_dim": 32,
  "data.num_local": 1,
  "data.global_size": 16,
  "data.local_size": 8,
}


@pytest.fixture(scope="module")
def env():
  # The session's compilation cache (tests/conftest.py) comes with os.environ.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return env


@pytest.fixture(scope="module")
def workdir(env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("export_run")
  cmd = [
    sys.executable,
    "-m",
    "simdino_jax.train",
    "--config=configs/demo.py",
    f"--workdir={workdir}",
    *(f"--config.{k}={v}" for k, v in OVERRIDES.items()),
  ]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir


@pytest.fixture(scope="module")
def reference(workdir):
  """{"teacher"|"student": {name: array}} of the checkpoint, restored whole onto the Trainer's abstract state."""
  with checkpointing.Checkpointer(workdir / "checkpoints") as ckpt:
    assert ckpt.all_steps() == [2]
    config = ml_collections.ConfigDict(ckpt.restore_config(2))
    state = ckpt.restore(2, trainer.Trainer(config, str(workdir)).abstract_state())
  return {
    which: {k: np.asarray(v) for k, v in named_leaves(getattr(state, which)).items()}
    for which in ("teacher", "student")
  }


def assert_arrays_equal(got, expected):
  assert sorted(got) == sorted(expected)
  for name, value in expected.items():
    assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
    np.testing.assert_array_equal(got[name], value, err_msg=name)


def backbone(arrays):
  return {k: v for k, v in arrays.items() if k.startswith("backbone/")}


# ---- a safetensors reader written from the specification (https://github.com/huggingface/safetensors) ---------
SPEC_DTYPES = {
  "F64": "<f8",
  "F32": "<f4",
  "F16": "<f2",
  "I64": "<i8",
  "I32": "<i4",
  "I16": "<i2",
  "I8": "i1",
  "U64": "<u8",
  "U32": "<u4",
  "U16": "<u2",
  "U8": "u1",
  "BOOL": "?",
}


def spec_parse(path):
  """8 bytes: N, an unsigned little-endian 64-bit integer; N bytes: a UTF-8 JSON object (may be padded with
  spaces) mapping tensor names to {"dtype", "shape", "data_offsets": [BEGIN, END]} (offsets relative to the byte
  buffer after the header) plus an optional "__metadata__" str->str map; then the byte buffer, which the
  tensors cover exactly, without holes or overlaps."""
  raw = open(path, "rb").read()
  n = struct.unpack("<Q", raw[:8])[0]
  text = raw[8 : 8 + n].decode("utf-8")
  assert text.startswith("{") and text.rstrip(" ") == text.rstrip()
  header = json.loads(text)
  metadata = header.pop("__metadata__", {})
  assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
  buffer = raw[8 + n :]
  tensors, covered = {}, []
  for name, info in header.items():
    assert set(info) == {"dtype", "shape", "data_offsets"}, info
    begin, end = info["data_offsets"]
    dtype = np.dtype(SPEC_DTYPES[info["dtype"]])
    count = int(np.prod(info["shape"]))
    assert end - begin == count * dtype.itemsize
    tensors[name] = np.frombuffer(buffer[begin:end], dtype=dtype).reshape(info["shape"])
    covered.append((begin, end))
  covered.sort()
  assert covered[0][0] == 0 and covered[-1][1] == len(buffer)
  assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
  return tensors, metadata


# ---- tests ------------------------------------------------------------------------------------------------------
def test_cli_safetensors_export_equals_the_checkpoint_teacher_backbone(workdir, env, reference, tmp_path):
  output = tmp_path / "teacher.safetensors"
  out = subprocess.run(
    [sys.executable, "-m", "simdino_jax.export", f"--workdir={workdir}", "--format=safetensors", f"--output={output}"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  expected = backbone(reference["teacher"])
  n_params = sum(v.size for v in expected.values())
  assert f"{len(expected)} arrays, {n_params:,} parameters" in out.stdout and str(output) in out.stdout
  assert "teacher backbone of step 2" in out.stdout
  assert "Restoring checkpoint" not in out.stderr  # orbax's INFO logs stay quiet
  assert "backbone/blocks/0/attn/qkv/kernel" in expected

  assert_arrays_equal(formats.load_arrays(output), expected)
  tensors, metadata = spec_parse(output)
  assert_arrays_equal(tensors, expected)
  assert metadata["step"] == "2" and metadata["which"] == "teacher" and metadata["with_head"] == "false"
  with checkpointing.Checkpointer(workdir / "checkpoints") as ckpt:
    assert json.loads(metadata["config"]) == ckpt.restore_config(2)
  assert formats.load_metadata(output) == metadata
  assert_arrays_equal(safetensors.numpy.load_file(str(output)), expected)  # the reference implementation


def test_npz_export_of_the_student_with_head(workdir, reference, tmp_path, monkeypatch):
  import orbax.checkpoint as ocp

  # Exporting is read-only: an orbax CheckpointManager would delete a running training's unfinished saves
  # ("N.orbax-checkpoint-tmp-*") in a background thread as it starts, so export must never construct one.
  def refuse(*args, **kwargs):
    raise AssertionError("export constructed a CheckpointManager")

  monkeypatch.setattr(ocp.CheckpointManager, "__init__", refuse)
  summary = export.export(str(workdir), str(tmp_path / "student.npz"), which="student", with_head=True)
  monkeypatch.undo()
  assert summary["format"].startswith("npz") and summary["step"] == 2  # the format follows the extension
  got = formats.load_arrays(tmp_path / "student.npz")
  assert any(k.startswith("head/") for k in got)
  assert_arrays_equal(got, reference["student"])
  assert not all(np.array_equal(reference["student"][k], reference["teacher"][k]) for k in got)  # really the student
  assert formats.load_metadata(tmp_path / "student.npz")["which"] == "student"
  # Defaults: safetensors into WORKDIR/export/, the newest step, the teacher backbone.
  summary = export.export(str(workdir), step=2)
  assert summary["output"] == os.path.join(str(workdir), "export", "teacher_backbone_step2_flax.safetensors")
  assert_arrays_equal(formats.load_arrays(summary["output"]), backbone(reference["teacher"]))


def test_bfloat16_and_odd_shapes_round_trip_in_both_formats(tmp_path):
  import ml_dtypes

  arrays = {
    "a/bf16": np.linspace(-3, 3, 12, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(3, 4),
    "b/scalar": np.array(2.5, np.float32),
    "c/int": np.arange(5, dtype=np.int64),
    "d/empty": np.zeros((0, 3), np.float16),
    "e/f64": np.ones((2, 1, 2)),
    "f/transposed": np.arange(6, dtype=np.float32).reshape(2, 3).T,  # a strided view, written in index order
    "g/f8": np.linspace(0, 1, 5).astype(ml_dtypes.float8_e4m3fn),
  }
  for name, save in (("x.safetensors", formats.save_safetensors), ("x.npz", formats.save_npz)):
    save(arrays, str(tmp_path / name), {"k": "v"})
    assert_arrays_equal(formats.load_arrays(tmp_path / name), arrays)
    assert formats.load_metadata(tmp_path / name) == {"k": "v"}
  raw = (tmp_path / "x.safetensors").read_bytes()
  n = struct.unpack("<Q", raw[:8])[0]
  assert (8 + n) % 8 == 0  # header padded: the data starts 8-byte aligned
  header = json.loads(raw[8 : 8 + n])
  assert header["a/bf16"]["dtype"] == "BF16" and header["g/f8"]["dtype"] == "F8_E4M3"  # what PyTorch reads back


def test_errors_name_the_path(workdir, env, tmp_path):
  with pytest.raises(ExportError, match=f"{tmp_path / 'none' / 'checkpoints'} does not exist"):
    restore.restore_params(str(tmp_path / "none"))
  assert not (tmp_path / "none").exists()  # nothing created
  (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
  with pytest.raises(ExportError, match="holds no committed checkpoint"):
    export.export(str(tmp_path / "empty"), str(tmp_path / "x.npz"))
  with pytest.raises(ExportError, match=r"no committed checkpoint of step 7 .* available steps: \[2\]"):
    restore.restore_params(str(workdir), step=7)
  (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
  with pytest.raises(ExportError, match="garbage.safetensors: not a safetensors file"):
    formats.load_arrays(tmp_path / "garbage.safetensors")

  out = subprocess.run(
    [sys.executable, "-m", "simdino_jax.export", f"--workdir={tmp_path / 'none'}"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 1 and f"error: no checkpoints to export: {tmp_path / 'none' / 'checkpoints'}" in out.stderr


# ---- formats that cannot be mixed up (issue 28, item 3) ---------------------------------------------------------
def test_torch_format_without_pytorch_is_an_error_naming_the_fallback_and_writes_nothing(
  workdir, tmp_path, monkeypatch
):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError, installed or not
  for output in (str(tmp_path / "vit.pth"), None):
    with pytest.raises(
      ExportError, match=r"PyTorch is not importable.*pip install torch.*--output=\S+\.safetensors"
    ) as e:
      export.export(str(workdir), output, fmt="torch")
    assert "\n" not in str(e.value)
  assert not os.listdir(tmp_path) and not (workdir / "export" / "teacher_backbone_step2_torch.pth").exists()


def test_default_names_carry_the_layout_and_files_are_created_like_open_does(workdir, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)
  old = os.umask(0o022)
  try:
    flax = export.export(str(workdir))
    torch_st = export.export(str(workdir), str(tmp_path / "vit_torch.safetensors"), fmt="torch")
    torch_npz = export.export(str(workdir), str(tmp_path / "vit_torch.npz"), fmt="torch")
    npz = export.export(str(workdir), str(tmp_path / "flax.npz"))
  finally:
    os.umask(old)
  assert flax["output"].endswith("teacher_backbone_step2_flax.safetensors")
  assert export.default_output(str(workdir), "torch", "teacher", 2, False).endswith("teacher_backbone_step2_torch.pth")
  assert len({export.default_output(str(workdir), f, "teacher", 2, False) for f in export.FORMATS}) == 3
  assert "torch (safetensors" in torch_st["format"] and "torch (npz" in torch_npz["format"]
  # The official names in both containers (not our slash names), the flax file untouched by the torch exports.
  assert "blocks.0.attn.qkv.weight" in formats.load_arrays(torch_st["output"])
  assert "blocks.0.attn.qkv.weight" in formats.load_arrays(torch_npz["output"])
  assert "backbone/blocks/0/attn/qkv/kernel" in formats.load_arrays(flax["output"])
  for summary in (flax, torch_st, torch_npz, npz):  # what open() gives under umask 022 (safetensors' own: 0600)
    assert oct(os.stat(summary["output"]).st_mode & 0o777) == oct(0o644), summary["output"]


def test_torch_export_names_the_official_constructor(workdir, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)
  summary = export.export(str(workdir), str(tmp_path / "vit.safetensors"), fmt="torch")
  # configs/demo.py with OVERRIDES: width 24, depth 1, 3 heads, patch 4, 16 px; no LayerScale/registers: DINO v1.
  assert summary["constructor"].startswith(
    "vision_transformer.VisionTransformer(img_size=[16], patch_size=4, embed_dim=24, depth=1, num_heads=3, "
    "mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))"
  )
  line = export._summary_line(summary)
  assert "load_state_dict(strict=True) into the official vision_transformer.VisionTransformer(" in line
