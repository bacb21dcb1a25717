"""Replays recorded augmentation draws in timm's own RandAugment, Mixup and RandomErasing (run by SIMDINO_TORCH_PYTHON).

argv: input .npz, output .npz. The input holds ``jobs`` (a JSON list) and the arrays the jobs name. timm's modules
are loaded from their files (timm/data/auto_augment.py, mixup.py, random_erasing.py) without timm's package
``__init__`` (which imports torchvision and the model zoo); their random number calls (``random.*``,
``np.random.*``, ``torch...normal_``) are replaced by the draws recorded on our side, so timm's own code computes the
op arguments, boxes, lambdas and images from the same decisions. Jobs:

* ``randaugment``: builds ``rand_augment_transform(spec, aa_params)`` with ``create_transform``'s ``aa_params``
  (translate_const = int(0.45 img_size), img_mean = round(255 mean), interpolation unless "random") and calls it
  on ``image`` with ``np.random.choice`` returning the recorded ops; per op, ``random.random()`` returns the
  recorded apply decision first and the sign decision second, ``random.gauss`` / ``random.uniform`` the recorded
  magnitude and ``random.choice`` the recorded interpolation. Also reports timm's op names and parsed settings.
* ``mixup``: ``Mixup(...)(x, target)`` in mode "batch" with ``np.random.rand`` / ``beta`` / ``randint`` scripted.
* ``erasing``: ``RandomErasing(...)(x)`` on one CHW image with ``random.*`` scripted and ``_get_pixels`` returning
  the recorded noise for the box timm chose.
"""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image


def _load(name):
  spec = importlib.util.find_spec("timm")
  path = os.path.join(spec.submodule_search_locations[0], "data", f"{name}.py")
  mod_spec = importlib.util.spec_from_file_location(f"timm_data_{name}", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod


class _ScriptedOp:
  """Wraps one of timm's AugmentOps: while it runs, the module's ``random`` answers with this op's records."""

  def __init__(self, op, record, fake):
    self.op, self.record, self.fake = op, record, fake

  def __call__(self, img):
    name, applied, magnitude, negate, interp = self.record
    assert self.op.name == name, (self.op.name, name)
    apply = [0.0 if applied else 1.0] if self.op.prob < 1.0 else []  # timm draws it only when prob < 1
    self.fake.script(apply + [0.9 if negate else 0.1], magnitude, interp)
    return self.op(img)


class _FakeRandom:
  def script(self, uniforms, magnitude, interp):
    self.uniforms, self.magnitude, self.interp = list(uniforms), magnitude, interp

  def random(self):
    return self.uniforms.pop(0)

  def gauss(self, mu, sigma):
    return self.magnitude

  def uniform(self, a, b):
    return self.magnitude

  def choice(self, seq):
    want = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[self.interp]
    assert want in seq, (want, seq)
    return want


def _randaugment(aa, job, arrays):
  mean = job["mean"]
  aa_params = dict(translate_const=int(job["img_size"] * 0.45), img_mean=tuple(min(255, round(255 * x)) for x in mean))
  if job["interpolation"] != "random":
    aa_params["interpolation"] = {
      "bilinear": Image.Resampling.BILINEAR,
      "bicubic": Image.Resampling.BICUBIC,
      "nearest": Image.Resampling.NEAREST,
    }[job["interpolation"]]
  ra = aa.rand_augment_transform(job["spec"], aa_params)
  fake = _FakeRandom()
  aa.random = fake
  names = [op.name for op in ra.ops]
  real_choice = np.random.choice

  def choice(ops, n, replace=True, p=None):
    assert n == len(job["ops"]) and replace and p is None
    return [_ScriptedOp(ops[names.index(r[0])], r, fake) for r in job["ops"]]

  np.random.choice = choice
  try:
    out = np.asarray(ra(Image.fromarray(arrays[job["image"]])))
  finally:
    np.random.choice = real_choice
  op0 = ra.ops[0]
  info = dict(
    names=names,
    num_layers=ra.num_layers,
    prob=op0.prob,
    magnitude=op0.magnitude,
    magnitude_std=op0.magnitude_std,
    magnitude_max=op0.magnitude_max,
    fill=list(op0.kwargs["fillcolor"]),
  )
  return out, info


def _mixup(mixup_mod, job, arrays):
  import torch

  d = job["draws"]
  rands = [0.0 if d["mix"] else 1.0, 0.0 if d["use_cutmix"] else 1.0]
  ints = [d["cy"], d["cx"]]
  saved = np.random.rand, np.random.beta, np.random.randint
  np.random.rand = lambda *a: rands.pop(0)
  np.random.beta = lambda a, b, size=None: float(d["lam"])

  def randint(lo, hi, size=None):
    v = ints.pop(0)
    assert lo <= v < hi, (v, lo, hi)
    return v

  np.random.randint = randint
  try:
    m = mixup_mod.Mixup(
      mixup_alpha=job["mixup_alpha"],
      cutmix_alpha=job["cutmix_alpha"],
      prob=job["prob"],
      switch_prob=job["switch_prob"],
      mode="batch",
      label_smoothing=job["smoothing"],
      num_classes=job["num_classes"],
    )
    x = torch.from_numpy(arrays[job["x"]].transpose(0, 3, 1, 2).copy())
    x, target = m(x, torch.from_numpy(arrays[job["labels"]]).long())
  finally:
    np.random.rand, np.random.beta, np.random.randint = saved
  return x.numpy().transpose(0, 2, 3, 1), target.numpy()


class _ErasingRandom:
  """timm's _erase call sequence: random() (apply), [randint(count)], then per box and attempt uniform(area),
  uniform(log aspect), and for the accepted attempt randint(top), randint(left)."""

  def __init__(self, d, lo, hi):
    self.d, self.k, self.a, self.phase, self.count_pending = d, 0, 0, 0, lo != hi
    self.offsets = []

  def random(self):
    return 0.0 if self.d["erase"] else 1.0

  def randint(self, lo, hi):
    if self.count_pending:
      self.count_pending = False
      return int(self.d["count"])
    v = int(self.d["top"][self.k] if not self.offsets else self.d["left"][self.k])
    assert lo <= v <= hi, (v, lo, hi)
    self.offsets.append(v)
    return v

  def uniform(self, lo, hi):
    if self.a == 10 or len(self.offsets) == 2:  # the previous box gave up or was placed: next box
      self.k, self.a, self.offsets = self.k + 1, 0, []
    src = self.d["area"] if self.phase == 0 else self.d["log_aspect"]
    v = float(src[self.k][self.a])
    self.a += self.phase
    self.phase = 1 - self.phase
    return v


def _erasing(er, job, arrays):
  import torch

  d = job["draws"]
  noise = arrays[job["noise"]]  # (max_count, H, W, C)
  lo, hi = job["min_count"], job["max_count"]
  fake = _ErasingRandom(d, lo, hi)
  er.random = fake

  def get_pixels(per_pixel, rand_color, patch_size, dtype=torch.float32, device="cpu"):
    top, left = fake.offsets
    c, h, w = patch_size
    return torch.from_numpy(noise[fake.k, top : top + h, left : left + w].transpose(2, 0, 1).copy()).to(dtype)

  er._get_pixels = get_pixels
  kw = {k: job[k] for k in ("min_area", "max_area", "min_aspect")}
  t = er.RandomErasing(job["probability"], mode=job["mode"], min_count=lo, max_count=hi, device="cpu", **kw)
  x = torch.from_numpy(arrays[job["x"]].transpose(2, 0, 1).copy())
  return t(x).numpy().transpose(1, 2, 0)


def run(python, jobs, arrays):
  """Runs this driver with ``python`` (the tests' entry point): returns (timm's output arrays, per-job infos)."""
  with tempfile.TemporaryDirectory() as tmp:
    src, dst = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
    np.savez(src, jobs=np.array(json.dumps(jobs)), **arrays)
    proc = subprocess.run([python, __file__, src, dst], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = dict(np.load(dst))
  return out, json.loads(str(out.pop("infos")))


def main(src, dst):
  data = np.load(src)
  arrays = {k: data[k] for k in data.files}
  jobs = json.loads(str(arrays.pop("jobs")))
  mods = {}
  out, infos = {}, []
  for i, job in enumerate(jobs):
    kind = job["kind"]
    if kind == "randaugment":
      aa = mods.setdefault("aa", _load("auto_augment"))
      out[f"{i}/image"], info = _randaugment(aa, job, arrays)
      infos.append(info)
    elif kind == "mixup":
      mx = mods.setdefault("mixup", _load("mixup"))
      out[f"{i}/x"], out[f"{i}/target"] = _mixup(mx, job, arrays)
      infos.append(None)
    elif kind == "erasing":
      er = mods.setdefault("erasing", _load("random_erasing"))
      out[f"{i}/x"] = _erasing(er, job, arrays)
      infos.append(None)
    else:
      raise ValueError(kind)
  out["infos"] = np.array(json.dumps(infos))
  np.savez(dst, **out)
  print("ok")


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
