"""PyTorch interop: our ViT <-> the official DINO / DINOv2 state dicts (names, layouts, import errors), and
load_backbone from a workdir and from exported files.

The layouts are checked against NumPy written from the official code's definitions (Conv2d OIHW over NCHW images,
Linear y = x W^T + b, the (3, heads, head_dim) qkv split, registers after the pos-embed add), not against our own
conversion; the .pth test runs only when PyTorch is importable (it is not a dependency).
"""

import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from conftest import make_tiny_config
from flax import nnx

from simdino_jax import export, methods
from simdino_jax.backbone import load_backbone
from simdino_jax.errors import ExportError, InteropError
from simdino_jax.io import checkpointing, formats, torch_interop
from simdino_jax.io.torch_interop import load_state_dict, to_torch
from simdino_jax.models.vit import VisionTransformer
from simdino_jax.tree import map_with_name, named_leaves

D, P, IMG = 32, 4, 16
V2 = dict(num_registers=2, layerscale_init=0.1)


def random_params(abstract_state, seed):
  """{name: array}: every parameter random (LayerNorm scales, LayerScale, tokens too), drawn in NumPy."""
  rng = np.random.default_rng(seed)
  return {k: rng.normal(0.0, 0.3, v.shape).astype(np.float32) for k, v in named_leaves(abstract_state).items()}


def random_vit(seed=0, **kw):
  """A tiny ViT with random parameters, and those parameters. Built from shapes: no eager JAX initialisation,
  whose op-by-op compiles cost seconds on the shared CPU."""
  args = dict(patch_size=P, embed_dim=D, depth=2, num_heads=2, img_size=IMG)
  args.update(kw)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: VisionTransformer(**args, rngs=nnx.Rngs(seed))))
  values = random_params(state, seed)
  return nnx.merge(graphdef, map_with_name(lambda name, _: jnp.asarray(values[name]), state)), values


@nnx.jit
def forward(model, x):
  return model(x)


def images(b=2, h=IMG, w=IMG, seed=1):
  return np.random.default_rng(seed).normal(size=(b, h, w, 3)).astype(np.float32)


# ---- names and layouts ------------------------------------------------------------------------------------------
def test_export_names_and_shapes_follow_the_official_dino_and_dinov2_vits():
  _, v1 = random_vit()
  v1["mask_token"] = np.zeros_like(v1["mask_token"])  # untrained: DINO v1 has no mask token
  sd = to_torch(v1)
  per_block = [
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
  ]
  official_v1 = {
    "cls_token",
    "pos_embed",
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
    "norm.weight",
    "norm.bias",
    *[f"blocks.{i}.{n}" for i in range(2) for n in per_block],
  }
  assert set(sd) == official_v1
  assert sd["patch_embed.proj.weight"].shape == (D, 3, P, P)  # Conv2d (out, in, kh, kw)
  assert sd["blocks.1.attn.qkv.weight"].shape == (3 * D, D)  # Linear (out, in)
  assert sd["blocks.0.mlp.fc1.weight"].shape == (4 * D, D)
  assert sd["pos_embed"].shape == (1, 1 + (IMG // P) ** 2, D) and sd["cls_token"].shape == (1, 1, D)

  _, v2 = random_vit(**V2)
  sd2 = to_torch(v2)
  extra = {"register_tokens", "mask_token", *[f"blocks.{i}.ls{j}.gamma" for i in range(2) for j in (1, 2)]}
  assert set(sd2) == official_v1 | extra
  assert sd2["register_tokens"].shape == (1, 2, D) and sd2["mask_token"].shape == (1, D)
  assert sd2["blocks.0.ls1.gamma"].shape == (D,)


def numpy_official_forward(sd, x_nchw, num_heads, num_registers):
  """The official ViT's forward in float64 NumPy, from its state dict in the official layout."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  w = sd["patch_embed.proj.weight"]
  dim, _, p, _ = w.shape
  b, c, h, wd = x_nchw.shape
  # Conv2d(kernel = stride = p): out[b, o, i, j] = sum_{c, u, v} W[o, c, u, v] x[b, c, i p + u, j p + v] + bias[o]
  windows = x_nchw.reshape(b, c, h // p, p, wd // p, p)
  tok = np.einsum("bciujv,ocuv->bijo", windows, w).reshape(b, -1, dim) + sd["patch_embed.proj.bias"]
  x = np.concatenate([np.broadcast_to(sd["cls_token"], (b, 1, dim)), tok], 1) + sd["pos_embed"]
  if num_registers:
    x = np.concatenate([x[:, :1], np.broadcast_to(sd["register_tokens"], (b, num_registers, dim)), x[:, 1:]], 1)

  def ln(z, name):
    mu, var = z.mean(-1, keepdims=True), z.var(-1, keepdims=True)
    return (z - mu) / np.sqrt(var + 1e-6) * sd[f"{name}.weight"] + sd[f"{name}.bias"]

  def linear(z, name):
    return z @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

  t, hd = x.shape[1], dim // num_heads
  i = 0
  while f"blocks.{i}.norm1.weight" in sd:
    pre = f"blocks.{i}"
    qkv = linear(ln(x, f"{pre}.norm1"), f"{pre}.attn.qkv").reshape(b, t, 3, num_heads, hd).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv
    logits = q @ k.transpose(0, 1, 3, 2) * hd**-0.5
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    y = linear((attn @ v).transpose(0, 2, 1, 3).reshape(b, t, dim), f"{pre}.attn.proj")
    x = x + y * sd.get(f"{pre}.ls1.gamma", 1.0)
    z = linear(ln(x, f"{pre}.norm2"), f"{pre}.mlp.fc1")
    z = linear(0.5 * z * (1.0 + scipy.special.erf(z / np.sqrt(2.0))), f"{pre}.mlp.fc2")
    x = x + z * sd.get(f"{pre}.ls2.gamma", 1.0)
    i += 1
  x = ln(x, "norm")
  return x[:, 0], x[:, 1 + num_registers :]


@pytest.mark.parametrize("kw", [{}, V2], ids=["dino", "dinov2_registers_layerscale"])
def test_exported_state_dict_run_by_numpy_official_vit_gives_our_features(kw):
  model, params = random_vit(**kw)
  x = images()
  sd = to_torch(params)
  cls, patch = numpy_official_forward(sd, x.transpose(0, 3, 1, 2).astype(np.float64), 2, kw.get("num_registers", 0))
  out = forward(model, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(out["cls"]), cls, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(out["patch"]), patch, atol=2e-5, rtol=1e-4)


def test_patch_embedding_equals_a_numpy_convolution_with_the_exported_oihw_weight():
  model, params = random_vit()
  weight = to_torch(params)["patch_embed.proj.weight"]  # (D, 3, p, p)
  bias = params["patch_embed/bias"]
  x = images(b=1, h=8, w=12)
  nchw = x.transpose(0, 3, 1, 2).astype(np.float64)
  expected = np.zeros((1, D, 8 // P, 12 // P))
  for i in range(8 // P):  # the sliding-window definition of a stride-p convolution
    for j in range(12 // P):
      window = nchw[0, :, i * P : (i + 1) * P, j * P : (j + 1) * P]
      expected[0, :, i, j] = np.tensordot(weight, window, axes=([1, 2, 3], [0, 1, 2])) + bias
  got = np.asarray(model.patch_embed(jnp.asarray(x)))  # (1, N, D), patches row-major as torch's flatten(2)
  np.testing.assert_allclose(got, expected.reshape(1, D, -1).transpose(0, 2, 1), atol=1e-5)


# ---- round trips ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, V2], ids=["dino", "dinov2_registers_layerscale"])
def test_export_then_import_gives_identical_features(kw, tmp_path):
  model, params = random_vit(**kw)
  x = jnp.asarray(images())
  want = forward(model, x)
  sd = to_torch(params)
  path = str(tmp_path / "vit.safetensors")
  formats.save_safetensors(sd, path)
  for source in (sd, path):
    imported = load_state_dict(source, num_heads=2)
    assert imported.kwargs["num_registers"] == kw.get("num_registers", 0)
    assert (imported.kwargs["layerscale_init"] is not None) == ("layerscale_init" in kw)
    assert (imported.kwargs["patch_size"], imported.kwargs["img_size"], imported.kwargs["depth"]) == (P, IMG, 2)
    for name, value in params.items():
      np.testing.assert_array_equal(imported.params[name], value, err_msg=name)
    got = forward(imported.build(), x)
    np.testing.assert_array_equal(np.asarray(got["cls"]), np.asarray(want["cls"]))
    np.testing.assert_array_equal(np.asarray(got["patch"]), np.asarray(want["patch"]))


def test_import_accepts_official_checkpoint_prefixes_and_chunked_blocks():
  _, params = random_vit(**V2)
  sd = to_torch(params)
  # DINOv2's BlockChunk layout blocks.<chunk>.<i>, inside a training checkpoint with both networks and heads.
  chunked = {k.replace("blocks.1.", "blocks.1.1.").replace("blocks.0.", "blocks.0.0."): v for k, v in sd.items()}
  student = {k: v + 1.0 for k, v in chunked.items()}
  ckpt = {
    "model": {
      **{f"module.teacher.backbone.{k}": v for k, v in chunked.items()},
      **{f"module.student.backbone.{k}": v for k, v in student.items()},
      "module.teacher.dino_head.mlp.0.weight": np.zeros((3, D), np.float32),
    },
    "optimizer": {"state": {}},
    "iteration": np.int64(3),
  }
  teacher = load_state_dict(ckpt, num_heads=2)
  assert teacher.ignored == ["module.teacher.dino_head.mlp.0.weight"]
  np.testing.assert_array_equal(teacher.params["blocks/1/attn/qkv/kernel"], params["blocks/1/attn/qkv/kernel"])
  got = load_state_dict(ckpt, which="student", num_heads=2)
  np.testing.assert_array_equal(got.params["blocks/1/ls2/gamma"], params["blocks/1/ls2/gamma"] + 1.0)
  with pytest.raises(InteropError, match=r"unexpected keys \(strict=True\).*dino_head"):
    load_state_dict(ckpt, num_heads=2, strict=True)
  # DINO v1's checkpoint.pth: {"student": {"module.backbone.*", "module.head.*"}, "teacher": {...}}; no mask token.
  v1 = {k: v for k, v in sd.items() if k != "mask_token"}
  dino = {
    "teacher": {**{f"backbone.{k}": v for k, v in v1.items()}, "head.last_layer.weight_g": np.ones((1, 1))},
    "epoch": 3,
  }
  got = load_state_dict(dino, num_heads=2)
  np.testing.assert_array_equal(got.params["mask_token"], np.zeros((1, D), np.float32))
  assert got.ignored == ["head.last_layer.weight_g"]
  with pytest.raises(InteropError, match="holds 'teacher' but no 'student'"):
    load_state_dict(dino, which="student", num_heads=2)


def test_import_of_our_own_flax_layout_export_takes_heads_from_its_config(tmp_path):
  _, params = random_vit(**V2)
  path = str(tmp_path / "ours.npz")
  formats.save_npz(
    {f"backbone/{k}": v for k, v in params.items()},
    path,
    {
      "config": '{"model": {"variant": "mu/4", "embed_dim": 32, "depth": 2, "num_heads": 4, '
      '"img_size": 16, "num_registers": 2, "layerscale": 0.1, "drop_path_rate": 0.0, '
      '"drop_path_uniform": false, "token_init": "dinov2", "interpolate_offset": 0.0, '
      '"interpolate_antialias": true, "dtype": "float32"}}'
    },
  )
  imported = load_state_dict(path)
  # num_heads and the interpolation come from the file's config, not from the width // 64 default.
  assert imported.kwargs["num_heads"] == 4 and imported.kwargs["interpolate_antialias"] is True
  for name, value in params.items():
    np.testing.assert_array_equal(imported.params[name], value, err_msg=name)


def test_inference_of_mlp_ratio_swiglu_and_default_heads():
  _, params = random_vit(embed_dim=128, num_heads=2, depth=1, mlp_ratio=2.5)
  imported = load_state_dict(to_torch(params))
  assert imported.kwargs["num_heads"] == 2  # 128 // 64, as ViT-S/B/L
  assert int(128 * imported.kwargs["mlp_ratio"]) == 320
  _, params = random_vit(embed_dim=48, num_heads=2, depth=1, ffn="swiglu")
  imported = load_state_dict(to_torch(params), num_heads=3)
  assert imported.kwargs["ffn"] == "swiglu"
  assert imported.params["blocks/0/mlp/w12/kernel"].shape == params["blocks/0/mlp/w12/kernel"].shape
  with pytest.raises(InteropError, match="pass num_heads"):
    load_state_dict(to_torch(params))  # width 48: no width // 64 default


# ---- errors -------------------------------------------------------------------------------------------------------
def test_missing_key_fails_naming_the_key_and_its_shape():
  _, params = random_vit()
  sd = to_torch(params)
  del sd["blocks.1.attn.proj.bias"]
  with pytest.raises(InteropError, match=r"missing key 'blocks\.1\.attn\.proj\.bias' \(expected shape \[32\]\)"):
    load_state_dict(sd, num_heads=2)
  sd = to_torch(params)
  del sd["pos_embed"]
  with pytest.raises(InteropError, match="missing key 'pos_embed'"):
    load_state_dict(sd, num_heads=2)
  sd = {k: v for k, v in to_torch(params).items() if not k.startswith("blocks.0.")}
  with pytest.raises(InteropError, match=r"missing key 'blocks\.0\.\*'"):
    load_state_dict(sd, num_heads=2)


def test_wrong_shape_fails_naming_the_key_expected_and_got(tmp_path):
  _, params = random_vit()
  sd = to_torch(params)
  sd["blocks.0.attn.qkv.weight"] = sd["blocks.0.attn.qkv.weight"].T.copy()  # Flax (in, out) layout by mistake
  path = str(tmp_path / "bad.safetensors")
  formats.save_safetensors(sd, path)
  with pytest.raises(InteropError) as e:
    load_state_dict(path, num_heads=2)
  msg = str(e.value)
  assert path in msg and "'blocks.0.attn.qkv.weight' has shape [32, 96], expected [96, 32]" in msg
  with pytest.raises(InteropError, match=r"num_heads=5 does not divide the width 32"):
    load_state_dict(to_torch(params), num_heads=5)


def test_unreadable_inputs_fail_naming_the_path(tmp_path):
  with pytest.raises(InteropError, match="none.pth: no such file"):
    load_state_dict(str(tmp_path / "none.pth"))
  junk = tmp_path / "junk.safetensors"
  junk.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
  with pytest.raises(InteropError, match="junk.safetensors"):
    load_state_dict(str(junk))


# ---- PyTorch .pth (only with torch installed) -------------------------------------------------------------------
def test_pth_file_loads_back_and_patch_embedding_matches_torch_conv2d(tmp_path):
  torch = pytest.importorskip("torch")
  model, params = random_vit(**V2)
  sd = to_torch(params)
  path = str(tmp_path / "vit.pth")
  torch.save({"teacher": {f"backbone.{k}": torch.from_numpy(v) for k, v in sd.items()}}, path)
  imported = load_state_dict(path, num_heads=2)
  for name, value in params.items():
    np.testing.assert_array_equal(imported.params[name], value, err_msg=name)
  x = images()
  conv = torch.nn.functional.conv2d(
    torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
    torch.from_numpy(sd["patch_embed.proj.weight"]),
    torch.from_numpy(sd["patch_embed.proj.bias"]),
    stride=P,
  )
  np.testing.assert_allclose(
    np.asarray(model.patch_embed(jnp.asarray(x))), conv.flatten(2).transpose(1, 2).numpy(), atol=1e-5
  )


# ---- workdir -> export --format=torch -> load_backbone ----------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A workdir with a committed checkpoint of step 3 of a tiny SimDINOv2-shaped run (random student and teacher,
  saved the way the trainer saves them; only the parts export reads), an input batch and the teacher's features."""
  config = make_tiny_config()
  config.model.num_registers, config.model.layerscale, config.model.token_init = 2, 0.1, "dinov2"
  config.model.num_heads = 4  # not width // 64: must come from the stored config
  workdir = tmp_path_factory.mktemp("interop_run")
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: methods.build_network(config)))
  student, teacher = (
    map_with_name(lambda name, _, v=random_params(abstract, seed): v[name], abstract) for seed in (1, 2)
  )
  with checkpointing.Checkpointer(workdir / "checkpoints") as ckpt:
    ckpt.save(3, {"step": np.int32(3), "student": student, "teacher": teacher}, checkpointing.config_dict(config))
    ckpt.wait()
  x = images(h=16, w=16)
  net = nnx.merge(graphdef, jax.tree_util.tree_map(jnp.asarray, teacher))
  return workdir, x, forward(net.backbone, jnp.asarray(x))


def test_load_backbone_from_a_workdir_and_from_its_torch_export(run_dir):
  path, x, want = run_dir
  backbone = load_backbone(str(path))
  assert backbone.step == 3 and backbone.kwargs["num_heads"] == 4 and backbone.num_registers == 2
  out = backbone(x)
  assert set(out) == {"cls", "patch"} and out["cls"].shape == (2, D) and out["patch"].shape == (2, 16, D)
  # Backbone's jax.jit vs the fixture's nnx.jit: two separately built programs of a depth-2 ViT, so float32
  # reassociation, not bitwise (wrong or student weights would be off by O(1)).
  np.testing.assert_allclose(np.asarray(out["cls"]), np.asarray(want["cls"]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out["patch"]), np.asarray(want["patch"]), rtol=1e-5, atol=1e-5)

  # A .pth needs PyTorch (not a dependency); the same official state dict as safetensors does not.
  summary = export.export(str(path), str(path / "export" / "vit_torch.safetensors"), fmt="torch")
  assert summary["format"].startswith("torch (safetensors") and os.path.isfile(summary["output"])
  names = set(torch_interop.read_state_dict(summary["output"])[0])
  assert {"blocks.1.ls2.gamma", "register_tokens", "patch_embed.proj.weight"} <= names
  from_file = load_backbone(summary["output"])
  assert from_file.kwargs["num_heads"] == 4 and from_file.step == 3  # the run's config travels with the file
  got = from_file(x)
  np.testing.assert_allclose(np.asarray(got["cls"]), np.asarray(want["cls"]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got["patch"]), np.asarray(want["patch"]), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
    from_file(x.transpose(0, 3, 1, 2))
  with pytest.raises(ExportError, match="backbone only"):
    export.export(str(path), fmt="torch", with_head=True)


@pytest.mark.parametrize("num_layers", [1, 3])
def test_network_state_dict_run_by_a_numpy_dino_head_gives_our_logits_and_round_trips(num_layers):
  # The official DINOHead (dino/vision_transformer.py): x = mlp(x) (Linear, GELU, ..., Linear; a bare Linear when
  # nlayers == 1); x = F.normalize(x, dim=-1); x = last_layer(x) with weight = g * v / ||v|| (weight_norm, dim 0).
  from simdino_jax.models.heads import DINOHead  # pylint: disable=import-outside-toplevel

  head = DINOHead(
    12, hidden_dim=16, bottleneck_dim=8, num_layers=num_layers, num_prototypes=10, rngs=nnx.Rngs(params=0)
  )
  head.last_layer.weight_g[...] = jnp.linspace(0.5, 2.0, 10)  # g != 1 so its (K, 1) layout matters
  params = {f"head/{k}": np.asarray(v) for k, v in named_leaves(nnx.state(head, nnx.Param)).items()}
  params.update({f"backbone/{k}": v for k, v in random_vit(seed=3)[1].items()})
  sd = torch_interop.network_to_torch(params, flavor="dino")
  assert sd["head.last_layer.weight_g"].shape == (10, 1) and sd["head.last_layer.weight_v"].shape == (10, 8)
  assert "backbone.cls_token" in sd and "backbone.mask_token" not in sd  # DINO v1's ViT has no mask token
  x = np.random.default_rng(0).normal(size=(5, 12)).astype(np.float32)
  h = x
  linears = ["head.mlp"] if num_layers == 1 else [f"head.mlp.{2 * i}" for i in range(num_layers)]
  for i, name in enumerate(linears):
    h = h @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]
    if i < len(linears) - 1:
      h = 0.5 * h * (1 + scipy.special.erf(h / np.sqrt(2)))
  h = h / np.maximum(np.linalg.norm(h, axis=-1, keepdims=True), 1e-12)
  v, g = sd["head.last_layer.weight_v"], sd["head.last_layer.weight_g"]
  logits = h @ (g * v / np.linalg.norm(v, axis=1, keepdims=True)).T
  # Two float32 programs (XLA vs NumPy) over reductions of <= 16 terms: 1e-5 covers reassociation.
  np.testing.assert_allclose(np.asarray(head(jnp.asarray(x))["logits"]), logits, rtol=1e-5, atol=1e-5)
  back = torch_interop.network_from_torch(sd, params)
  assert set(back) == set(params)
  for k in params:
    np.testing.assert_array_equal(back[k], params[k], err_msg=k)  # layout changes only: exact


# ---- the official constructors (docs/interop.md, printed by the export command) --------------------------------
def test_official_modules_built_with_the_printed_constructor_load_strict_and_give_our_features():
  python, clones = os.environ.get("SIMDINO_TORCH_PYTHON"), os.environ.get("SIMDINO_OFFICIAL_DIR")
  if not python or not clones:
    pytest.skip(
      "needs SIMDINO_TORCH_PYTHON (a Python with torch and simdino_jax) and SIMDINO_OFFICIAL_DIR (the dino/ and "
      "dinov2/ clones) to build the official ViTs from torch_interop.official_constructor's text"
    )
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
    [python, os.path.join(root, "tests", "official_constructor_load.py"), clones],
    cwd=root,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  for name in ("dino", "dinov2_registers_layerscale", "dinov2_swiglu"):
    r = report[name]
    # float32 PyTorch vs XLA over a depth-2 ViT, features of scale ~3: reassociation only (wrong arguments: >5e-3).
    assert r["max_abs_diff"] < 5e-6, (name, r)
  assert report["dino"]["constructor"].startswith("vision_transformer.VisionTransformer(")
  assert "ffn_layer='swiglufused'" in report["dinov2_swiglu"]["constructor"]
  assert "num_register_tokens=2" in report["dinov2_registers_layerscale"]["constructor"]
  # The controls: the official defaults refuse the file (qkv.bias), LayerNorm's default eps loads and differs.
  assert "qkv.bias" in report["control_default_strict_error"]
  assert report["control_eps_1e-5_max_abs_diff"] > 1e-3
