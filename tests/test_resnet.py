"""The ResNet backbone (models/resnet.py) and its torchvision interop (io/torchvision_resnet.py).

References: torchvision's module structure (names written out from torchvision/models/resnet.py), a NumPy
transcription of torchvision's forward and of torch's BatchNorm2d formula (run on the exported torchvision-layout
state dict), and, when SIMDINO_TORCH_PYTHON names a Python with torch + torchvision, torchvision itself
(tests/torchvision_resnet_driver.py). Small variants (width 4-8, one block per stage, 32 px) keep it cheap.
"""

import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pod
import pytest
from flax import nnx

from simdino_jax.errors import InteropError
from simdino_jax.io import torch_interop
from simdino_jax.io.torchvision_resnet import from_torchvision, load_resnet_state_dict, to_torchvision
from simdino_jax.models import resnet as resnet_module
from simdino_jax.models.resnet import BatchNorm, ResNet, resnet, resnet_kwargs
from simdino_jax.tree import map_with_name, named_leaves

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {"block": "bottleneck", "layers": (1, 2, 1, 1), "width": 4}


def random_resnet(seed=0, **kw):
  """A ResNet with random weights, BN affine and running statistics (drawn in NumPy from the shapes: no eager JAX
  initialisation), and its state {name: array}."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: ResNet(**kw, rngs=nnx.Rngs(seed))))
  rng = np.random.default_rng(seed)
  values = {}
  for name, leaf in named_leaves(state).items():
    shape = leaf.shape
    if name.endswith("kernel"):
      kh, kw_, _, out = shape
      v = rng.normal(0.0, np.sqrt(2.0 / (kh * kw_ * out)), shape)
    elif name.endswith("scale"):
      v = rng.uniform(0.5, 1.5, shape)
    elif name.endswith(("bias", "mean")):
      v = rng.normal(0.0, 0.1, shape)
    elif name.endswith("var"):
      v = rng.uniform(0.5, 2.0, shape)
    else:  # num_batches_tracked
      v = np.full(shape, 7)
    values[name] = np.asarray(v, leaf.dtype)
  return nnx.merge(graphdef, map_with_name(lambda n, _: jnp.asarray(values[n]), state)), values


@nnx.jit(static_argnames="use_running_average")
def forward(model, x, use_running_average):
  return model(x, use_running_average=use_running_average)


def images(b=4, size=32, seed=1):
  return np.random.default_rng(seed).normal(size=(b, size, size, 3)).astype(np.float32)


# ---- NumPy transcription of torchvision's ResNet (NCHW, OIHW, torch's BatchNorm2d) -------------------------------
def np_conv(x, w, stride, pad):
  b, _, h, wd = x.shape
  o, _, k, _ = w.shape
  xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  ho, wo = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
  out = np.zeros((b, o, ho, wo))
  for u in range(k):
    for v in range(k):
      patch = xp[:, :, u : u + stride * ho : stride, v : v + stride * wo : stride]
      out += np.einsum("bchw,oc->bohw", patch, w[:, :, u, v])
  return out


def np_bn(x, sd, name, train, new):
  """torch.nn.functional.batch_norm: train normalises with the biased batch variance and updates the running
  statistics with momentum 0.1 and the unbiased variance; eval uses the running statistics. eps 1e-5."""
  if train:
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3))
    n = x.size // x.shape[1]
    new[f"{name}.running_mean"] = 0.9 * sd[f"{name}.running_mean"] + 0.1 * mean
    new[f"{name}.running_var"] = 0.9 * sd[f"{name}.running_var"] + 0.1 * var * n / (n - 1)
    new[f"{name}.num_batches_tracked"] = sd[f"{name}.num_batches_tracked"] + 1
  else:
    mean, var = sd[f"{name}.running_mean"], sd[f"{name}.running_var"]
  r = lambda a: a[None, :, None, None]
  return (x - r(mean)) / np.sqrt(r(var) + 1e-5) * r(sd[f"{name}.weight"]) + r(sd[f"{name}.bias"])


def np_torchvision_resnet(sd, x_nchw, train):
  """torchvision ResNet.forward (fc = Identity) in float64 from a state dict; returns (features, new statistics)."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  new = {}
  relu = lambda a: np.maximum(a, 0.0)
  stem = sd["conv1.weight"]
  cifar = stem.shape[-1] == 3
  x = relu(np_bn(np_conv(x_nchw, stem, 1 if cifar else 2, 1 if cifar else 3), sd, "bn1", train, new))
  if not cifar:  # MaxPool2d(3, 2, 1)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    ho, wo = (x.shape[2] - 1) // 2 + 1, (x.shape[3] - 1) // 2 + 1
    x = np.max([xp[:, :, u : u + 2 * ho : 2, v : v + 2 * wo : 2] for u in range(3) for v in range(3)], axis=0)
  for s in range(1, 5):
    i = 0
    while f"layer{s}.{i}.conv1.weight" in sd:
      p = f"layer{s}.{i}"
      stride = 2 if (s > 1 and i == 0) else 1
      bottleneck = f"{p}.conv3.weight" in sd
      if bottleneck:
        out = relu(np_bn(np_conv(x, sd[f"{p}.conv1.weight"], 1, 0), sd, f"{p}.bn1", train, new))
        out = relu(np_bn(np_conv(out, sd[f"{p}.conv2.weight"], stride, 1), sd, f"{p}.bn2", train, new))
        out = np_bn(np_conv(out, sd[f"{p}.conv3.weight"], 1, 0), sd, f"{p}.bn3", train, new)
      else:
        out = relu(np_bn(np_conv(x, sd[f"{p}.conv1.weight"], stride, 1), sd, f"{p}.bn1", train, new))
        out = np_bn(np_conv(out, sd[f"{p}.conv2.weight"], 1, 1), sd, f"{p}.bn2", train, new)
      if f"{p}.downsample.0.weight" in sd:
        short = np_bn(np_conv(x, sd[f"{p}.downsample.0.weight"], stride, 0), sd, f"{p}.downsample.1", train, new)
      else:
        short = x
      x = relu(out + short)
      i += 1
  return x.mean((2, 3)), new


# ---- names, shapes, counts ---------------------------------------------------------------------------------------
def torchvision_keys(layers, bottleneck):
  """The state-dict keys of torchvision's ResNet (models/resnet.py) without fc, written out from its modules."""
  bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
  keys = ["conv1.weight", *[f"bn1.{b}" for b in bn]]
  for s, n in enumerate(layers, 1):
    for i in range(n):
      for c in range(1, 4 if bottleneck else 3):
        keys += [f"layer{s}.{i}.conv{c}.weight", *[f"layer{s}.{i}.bn{c}.{b}" for b in bn]]
      if i == 0 and (s > 1 or bottleneck):  # stride 2, or 64 -> 256 channels
        keys += [f"layer{s}.{i}.downsample.0.weight", *[f"layer{s}.{i}.downsample.1.{b}" for b in bn]]
  return keys


def test_export_has_torchvision_names_and_shapes():
  _, values = random_resnet(**SMALL)
  sd = to_torchvision(values)
  assert sorted(sd) == sorted(torchvision_keys(SMALL["layers"], True))
  assert sd["conv1.weight"].shape == (4, 3, 7, 7)  # Conv2d (out, in, kh, kw)
  assert sd["layer1.0.conv3.weight"].shape == (16, 4, 1, 1)  # planes * 4
  assert sd["layer2.0.conv2.weight"].shape == (8, 8, 3, 3)  # v1.5: the stride sits on this 3x3
  assert sd["layer2.0.downsample.0.weight"].shape == (32, 16, 1, 1)
  assert sd["bn1.num_batches_tracked"].dtype == np.int64 and sd["bn1.num_batches_tracked"].shape == ()
  _, basic = random_resnet(block="basic", layers=(1, 1, 1, 1), width=4)
  assert sorted(to_torchvision(basic)) == sorted(torchvision_keys((1, 1, 1, 1), False))


def test_named_variants_have_torchvision_parameter_counts():
  # sum(p.numel() for p in torchvision.models.<arch>().parameters()) with fc = nn.Identity(), torchvision 0.28.0;
  # len(state_dict()) 318 for resnet50 (53 BNs x 5 + 53 convs).
  counts = {"resnet18": (11_176_512, 120), "resnet50": (23_508_032, 318)}
  for name, (params, keys) in counts.items():
    model = nnx.eval_shape(lambda name=name: resnet(name, rngs=nnx.Rngs(0)))
    p = named_leaves(nnx.state(model, nnx.Param))
    assert sum(v.size for v in p.values()) == params, name
    assert len(named_leaves(nnx.state(model))) == keys, name
  assert model.num_features == 2048
  keys50 = sorted(to_torchvision({k: np.zeros(v.shape, v.dtype) for k, v in named_leaves(nnx.state(model)).items()}))
  assert keys50 == sorted(torchvision_keys((3, 4, 6, 3), True))


def test_zero_init_residual_zeroes_the_last_bn_gamma_of_each_block(monkeypatch):
  # Zero conv kernels: the eager initialisation then costs no random-number compiles (the kernel init is tested below).
  monkeypatch.setattr(resnet_module, "kaiming_normal_fan_out", lambda key, shape, dtype=jnp.float32: jnp.zeros(shape))
  model = ResNet(block="basic", layers=(2, 1, 1, 1), width=4, zero_init_residual=True, rngs=nnx.Rngs(0))
  scales = {k: np.asarray(v) for k, v in named_leaves(nnx.state(model, nnx.Param)).items() if k.endswith("scale")}
  zero = sorted(k for k, v in scales.items() if not v.any())
  assert zero == sorted(f"layer{s}/{i}/bn2/scale" for s, n in enumerate((2, 1, 1, 1), 1) for i in range(n))
  assert all(v.all() for k, v in scales.items() if k not in zero)


def test_conv_kernels_follow_torch_kaiming_normal_fan_out():
  # torch.nn.init.kaiming_normal_(mode="fan_out", nonlinearity="relu"): std sqrt(2 / (out * kh * kw)), mean 0.
  k = np.asarray(resnet_module.kaiming_normal_fan_out(jax.random.key(0), (3, 3, 16, 64)))
  assert abs(k.std() / np.sqrt(2.0 / (64 * 9)) - 1.0) < 0.05 and abs(k.mean()) < 0.05 * k.std()


# ---- forward against the NumPy transcription ---------------------------------------------------------------------
@pytest.mark.parametrize(
  "kw",
  [SMALL, {"block": "basic", "layers": (1, 1, 1, 1), "width": 4, "cifar_stem": True}],
  ids=["bottleneck", "basic_cifar_stem"],
)
def test_forward_and_running_statistics_match_numpy_torchvision(kw):
  model, values = random_resnet(**kw)
  sd = to_torchvision(values)
  x = images()
  nchw = x.transpose(0, 3, 1, 2).astype(np.float64)
  want_eval, _ = np_torchvision_resnet(sd, nchw, train=False)
  got_eval = np.asarray(forward(model, jnp.asarray(x), True))
  np.testing.assert_allclose(got_eval, want_eval, rtol=1e-4, atol=1e-4 * np.abs(want_eval).max())
  assert np.asarray(model.bn1.num_batches_tracked[...]) == 7  # eval mode leaves the statistics alone

  want_train, new = np_torchvision_resnet(sd, nchw, train=True)
  got_train = np.asarray(forward(model, jnp.asarray(x), False))
  np.testing.assert_allclose(got_train, want_train, rtol=1e-4, atol=1e-4 * np.abs(want_train).max())
  after = to_torchvision(named_leaves(nnx.state(model)))
  assert sorted(new) == sorted(k for k in sd if k.endswith(("running_mean", "running_var", "num_batches_tracked")))
  for k, v in new.items():
    np.testing.assert_allclose(after[k], v, rtol=1e-4, atol=1e-5, err_msg=k)
  assert int(after["bn1.num_batches_tracked"]) == 8


def test_batchnorm_matches_torch_formula_over_two_steps_and_eval():
  rng = np.random.default_rng(3)
  bn = BatchNorm(3)
  bn.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, 3), jnp.float32)
  bn.bias[...] = jnp.asarray(rng.normal(size=3), jnp.float32)
  mean, var = np.zeros(3), np.ones(3)
  for step in range(2):
    x = (rng.normal(size=(4, 5, 6, 3)) * [1.0, 2.0, 0.5] + [0.0, 3.0, -1.0]).astype(np.float32)
    y = np.asarray(bn(jnp.asarray(x)))
    m, v = x.mean((0, 1, 2)), x.var((0, 1, 2))
    want = (x - m) / np.sqrt(v + 1e-5) * np.asarray(bn.scale[...]) + np.asarray(bn.bias[...])
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    mean, var = 0.9 * mean + 0.1 * m, 0.9 * var + 0.1 * v * 120 / 119  # torch: unbiased running variance
    np.testing.assert_allclose(np.asarray(bn.mean[...]), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.var[...]), var, rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked[...]) == step + 1
  bn.eval()
  y = np.asarray(bn(jnp.asarray(x)))
  want = (x - mean) / np.sqrt(var + 1e-5) * np.asarray(bn.scale[...]) + np.asarray(bn.bias[...])
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  assert int(bn.num_batches_tracked[...]) == 2


# ---- SyncBN: the batch statistics are those of the whole sharded batch -------------------------------------------
SHARDED = """
import json, jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from simdino_jax.models.resnet import ResNet
from simdino_jax.tree import map_with_name, named_leaves
assert jax.device_count() == 2
x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
# Random weights drawn in NumPy from the shapes (an eager or jitted initialisation costs seconds of compiles).
graphdef, abstract = nnx.split(nnx.eval_shape(lambda: ResNet(block="basic", layers=(1, 1, 1, 1), width=4, rngs=nnx.Rngs(0))))
rng = np.random.default_rng(0)
def draw(name, shape):
  leaf = name.split("/")[-1]
  if leaf in ("mean", "num_batches_tracked"):
    return np.zeros(shape)
  if leaf == "var":
    return np.ones(shape)
  return rng.normal(0.0, 0.3, shape) if leaf == "kernel" else rng.normal(0.5, 0.2, shape)
values = {k: draw(k, v.shape).astype(v.dtype) for k, v in named_leaves(abstract).items()}
@nnx.jit
def f(m, x):
  return m(x)
def run(x, sharding=None):
  model = nnx.merge(graphdef, map_with_name(lambda n, _: jnp.asarray(values[n]), abstract))
  x = jnp.asarray(x) if sharding is None else jax.device_put(x, sharding)
  y = f(model, x)
  stats = {k: np.asarray(v).tolist() for k, v in named_leaves(nnx.state(model, nnx.BatchStat)).items()}
  return np.asarray(y).tolist(), stats, len(y.sharding.device_set)
mesh = Mesh(np.array(jax.devices()), ("data",))
one, stats1, _ = run(x)
two, stats2, ndev = run(x, NamedSharding(mesh, P("data")))
half, _, _ = run(x[:2])
print("REPORT " + json.dumps(dict(one=one, two=two, half=half, stats1=stats1, stats2=stats2, ndev=ndev)))
"""


def test_two_device_sharded_forward_equals_one_device_syncbn():
  env = pod.env(2)
  out = subprocess.run(
    [sys.executable, "-c", SHARDED], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads([line for line in out.stdout.splitlines() if line.startswith("REPORT ")][-1][len("REPORT ") :])
  assert r["ndev"] == 2
  one, two = np.asarray(r["one"]), np.asarray(r["two"])
  # float32 reductions in another order (two partial sums + an all-reduce): ~1e-6 of the features' scale (~3).
  np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-5)
  for k in r["stats1"]:
    np.testing.assert_allclose(r["stats2"][k], r["stats1"][k], rtol=1e-5, atol=1e-5, err_msg=k)
  # The control: per-device statistics (BN over each device's 2 images) give different features.
  assert np.abs(np.asarray(r["half"]) - one[:2]).max() > 1e-3


# ---- import: round trip, DINO's layouts, errors ------------------------------------------------------------------
def test_import_round_trip_and_dino_checkpoint_layouts():
  _, values = random_resnet(**SMALL)
  sd = to_torchvision(values)
  imported = load_resnet_state_dict(sd, strict=True)
  assert imported.kwargs == {**SMALL, "cifar_stem": False, "in_chans": 3}
  assert sorted(imported.params) == sorted(values)
  for k, v in values.items():
    np.testing.assert_array_equal(imported.params[k], v, err_msg=k)  # layout changes only: exact
  # dino_resnet50_pretrain.pth is the bare dict above; a training checkpoint nests the DDP-wrapped MultiCropWrapper.
  ckpt = {
    "teacher": {**{f"module.backbone.{k}": v for k, v in sd.items()}, "module.head.last_layer.weight_g": np.ones(3)},
    "student": {f"module.backbone.{k}": v + 1.0 for k, v in sd.items()},
    "epoch": 3,
  }
  teacher = load_resnet_state_dict(ckpt)
  np.testing.assert_array_equal(teacher.params["layer2/1/conv2/kernel"], values["layer2/1/conv2/kernel"])
  assert teacher.ignored == ["module.head.last_layer.weight_g"]
  np.testing.assert_array_equal(
    load_resnet_state_dict(ckpt, which="student").params["bn1/bias"], values["bn1/bias"] + 1
  )
  # A full torchvision state dict: fc is ignored (refused with strict).
  full = {**sd, "fc.weight": np.zeros((10, 128), np.float32), "fc.bias": np.zeros(10, np.float32)}
  assert load_resnet_state_dict(full).ignored == ["fc.bias", "fc.weight"]
  with pytest.raises(InteropError, match="unexpected keys"):
    load_resnet_state_dict(full, strict=True)
  model = imported.build()
  assert isinstance(model, ResNet) and model.num_features == 128
  np.testing.assert_array_equal(np.asarray(model.layer4[0].downsample[1].var[...]), values["layer4/0/downsample/1/var"])
  assert sorted(from_torchvision(sd)) == sorted(values)
  # A file without the step counters (DINO's hubconf loads its release with strict=False): counted from 0.
  uncounted = load_resnet_state_dict({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")})
  assert int(uncounted.params["layer3/0/bn2/num_batches_tracked"]) == 0


def test_import_errors_name_the_torchvision_key():
  _, values = random_resnet(**SMALL)
  sd = to_torchvision(values)
  bad = dict(sd, **{"layer3.0.conv2.weight": np.zeros((16, 16, 1, 1), np.float32)})
  with pytest.raises(
    InteropError, match=r"'layer3.0.conv2.weight' has shape \[16, 16, 1, 1\], expected \[16, 16, 3, 3\]"
  ):
    load_resnet_state_dict(bad)
  missing = {k: v for k, v in sd.items() if k != "layer2.1.bn1.running_var"}
  with pytest.raises(InteropError, match="missing key 'layer2.1.bn1.running_var'"):
    load_resnet_state_dict(missing)
  with pytest.raises(InteropError, match="a torchvision ResNet state dict, not a ViT: .*load_resnet_state_dict"):
    torch_interop.load_state_dict({f"module.backbone.{k}": v for k, v in sd.items()})
  with pytest.raises(InteropError, match="batch statistics"):
    to_torchvision({k: v for k, v in values.items() if not k.endswith(("mean", "var", "tracked"))})


# ---- torchvision itself (skipped without SIMDINO_TORCH_PYTHON) ---------------------------------------------------
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_loads_the_export_strict_and_gives_our_features(arch):
  python = os.environ.get("SIMDINO_TORCH_PYTHON")
  if not python:
    pytest.skip("needs SIMDINO_TORCH_PYTHON (a Python with torch and torchvision) to run torchvision's ResNet")
  model, values = random_resnet(**resnet_kwargs(arch))
  sd = to_torchvision(values)
  x = images(b=4, size=64)
  with tempfile.TemporaryDirectory() as tmp:
    src, dst = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
    np.savez(src, arch=arch, images=x.transpose(0, 3, 1, 2), **{f"sd/{k}": v for k, v in sd.items()})
    out = subprocess.run(
      [python, os.path.join(ROOT, "tests", "torchvision_resnet_driver.py"), src, dst],
      check=False,
      capture_output=True,
      text=True,
      timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    theirs = dict(np.load(dst))
  loaded = {k[len("loaded/") :]: v for k, v in theirs.items() if k.startswith("loaded/")}
  back = load_resnet_state_dict(loaded, strict=True)  # torchvision's own state dict, imported back: exact
  for k, v in values.items():
    np.testing.assert_array_equal(back.params[k], v, err_msg=k)

  def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())

  # float32 on both sides; the reference for the size of rounding is torch's own float64 run. Train-mode BN over few
  # positions (resnet50's last stage: 4 images x 2x2) amplifies float32 rounding: measured torch float32 vs float64
  # 1.3e-4 relative for resnet50's train features (ours vs float64 1.1e-4), ~5e-7 in eval mode.
  for mode, running in (("eval", True), ("train", False)):
    got = np.asarray(forward(model, jnp.asarray(x), running))
    own = rel(theirs[mode], theirs[mode + "64"])
    assert rel(got, theirs[mode + "64"]) <= 2.0 * own + 2e-6, (mode, rel(got, theirs[mode + "64"]), own)
    assert rel(got, theirs[mode]) < (1e-5 if mode == "eval" or arch == "resnet18" else 5e-4), (mode, own)
  after = to_torchvision(named_leaves(nnx.state(model)))
  worst = 0.0
  for k, v in after.items():
    if k.endswith(("running_mean", "running_var")):
      worst = max(worst, rel(v, theirs[f"after/{k}"]))
    elif k.endswith("num_batches_tracked"):
      assert int(v) == int(theirs[f"after/{k}"]) == 8, k
  # The running statistics inherit the same conditioning (measured 7e-7 resnet18, 2.2e-5 resnet50).
  assert worst < (1e-5 if arch == "resnet18" else 1e-4), worst
