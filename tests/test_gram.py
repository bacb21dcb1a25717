"""Gram anchoring (losses/gram.py) against NumPy transcriptions of facebookresearch/dinov3: GramLoss.forward
(dinov3/loss/gram_loss.py), the refresh rule of dinov3/train/train.py and linear_warmup_cosine_decay
(dinov3/train/cosine_lr_scheduler.py), lines quoted at each transcription."""

import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simdino_jax import schedules
from simdino_jax.losses import gram


def np_normalize(x, eps=1e-12):  # F.normalize(x, dim=-1)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def np_gram_loss(output_feats, target_feats, *, img_level, apply_norm=True, remove_neg=False, only_teacher=False):
  """GramLoss.forward, line by line (float64)."""
  if apply_norm:
    target_feats = np_normalize(target_feats)  # target_feats = F.normalize(target_feats, dim=-1)
  if not img_level and target_feats.ndim == 3:
    target_feats = target_feats.reshape(-1, target_feats.shape[-1])  # target_feats.flatten(0, 1)
  target_sim = target_feats @ np.swapaxes(target_feats, -1, -2)  # torch.matmul(t, t.transpose(-1, -2))
  if apply_norm:
    output_feats = np_normalize(output_feats)
  if not img_level and output_feats.ndim == 3:
    output_feats = output_feats.reshape(-1, output_feats.shape[-1])
  student_sim = output_feats @ np.swapaxes(output_feats, -1, -2)
  if remove_neg:
    target_sim[target_sim < 0] = 0.0  # target_sim[target_sim < 0] = 0.0
    student_sim[student_sim < 0] = 0.0  # student_sim[student_sim < 0] = 0.0
  elif only_teacher:
    target_sim[target_sim < 0] = 0.0  # target_sim[target_sim < 0] = 0.0
    student_sim[(student_sim < 0) & (target_sim < 0)] = 0.0  # (executed after the line above, as in the original)
  return np.mean((student_sim - target_sim) ** 2)  # self.mse_loss(student_sim, target_sim)


@pytest.fixture(scope="module")
def feats():
  rng = np.random.default_rng(0)
  s = rng.standard_normal((4, 9, 6)) * 2.0
  t = s + 0.7 * rng.standard_normal((4, 9, 6))
  return s, t


@pytest.mark.parametrize("img_level", [True, False])
@pytest.mark.parametrize(
  "negatives, flags", [("keep", {}), ("remove", {"remove_neg": True}), ("teacher", {"only_teacher": True})]
)
@pytest.mark.parametrize("normalize", [True, False])
def test_gram_loss_matches_dinov3_gram_loss_forward(feats, img_level, negatives, flags, normalize):
  s, t = feats
  ref = np_gram_loss(s, t, img_level=img_level, apply_norm=normalize, **flags)
  got = gram.gram_loss(jnp.asarray(s), jnp.asarray(t), normalize=normalize, img_level=img_level, negatives=negatives)
  np.testing.assert_allclose(float(got), ref, rtol=2e-5)


def test_official_teacher_only_branch_never_clips_the_student_and_the_intended_one_does(feats):
  s, t = feats
  keep_teacher_clip = np_gram_loss(s, t, img_level=True, only_teacher=True)
  # The executed branch = clipping the teacher only (the student condition reads the already-clipped teacher).
  tn, sn = np_normalize(t), np_normalize(s)
  gt, gs = np.maximum(tn @ tn.transpose(0, 2, 1), 0), sn @ sn.transpose(0, 2, 1)
  np.testing.assert_allclose(keep_teacher_clip, np.mean((gs - gt) ** 2), rtol=1e-12)
  # The intended one zeroes the student where both were negative: a different, smaller loss on these features.
  gt_raw = tn @ tn.transpose(0, 2, 1)
  gs_int = np.where((gs < 0) & (gt_raw < 0), 0.0, gs)
  intended = np.mean((gs_int - gt) ** 2)
  got = gram.gram_loss(jnp.asarray(s), jnp.asarray(t), negatives="teacher_intended")
  np.testing.assert_allclose(float(got), intended, rtol=2e-5)
  assert intended < keep_teacher_clip


def test_batch_level_groups_are_the_per_device_losses_averaged(feats):
  s, t = feats
  per_device = [np_gram_loss(s[i : i + 2], t[i : i + 2], img_level=False) for i in (0, 2)]  # 2 GPUs x 2 images
  got = gram.gram_loss(jnp.asarray(s), jnp.asarray(t), img_level=False, groups=2)
  np.testing.assert_allclose(float(got), np.mean(per_device), rtol=2e-5)


@pytest.mark.parametrize("select", ["masked", "unmasked"])
def test_token_mask_is_the_official_gram_of_the_selected_rows(feats, select):
  s, t = feats
  mask = np.random.default_rng(1).random(s.shape[:2]) < 0.4
  rows = mask if select == "masked" else ~mask
  ref = np_gram_loss(s[rows], t[rows], img_level=False)  # student_patches[masks] -> (n_selected, D)
  got = gram.gram_loss(jnp.asarray(s), jnp.asarray(t), img_level=False, mask=jnp.asarray(rows))
  np.testing.assert_allclose(float(got), ref, rtol=2e-5)


def test_gram_teacher_gets_no_gradient(feats):
  s, t = (jnp.asarray(a, jnp.float32) for a in feats)
  g_s, g_t = jax.grad(lambda a, b: gram.gram_loss(a, b, negatives="remove"), argnums=(0, 1))(s, t)
  assert float(jnp.abs(g_s).sum()) > 0 and float(jnp.abs(g_t).sum()) == 0


def test_bad_options_are_refused(feats):
  s, t = (jnp.asarray(a) for a in feats)
  with pytest.raises(ValueError, match="negatives"):
    gram.gram_loss(s, t, negatives="clip")
  with pytest.raises(ValueError, match="img_level=False"):
    gram.gram_loss(s, t, mask=jnp.ones(s.shape[:2], bool))
  with pytest.raises(ValueError, match="row groups"):
    gram.gram_loss(s, t, img_level=False, groups=3)


@pytest.mark.parametrize(
  "first, every, max_updates", [(0, 5, 0), (10, 5, 3), (7, 5, 2), (12, 4, 0), (1, 1, 4), (23, 10, 1)]
)
def test_refreshes_follow_dinov3_training_loop(first, every, max_updates):
  """dinov3/train/train.py: after optimizer.step() and update_ema, `if cfg.gram.use_loss and model.gram_rep_update
  and (it + 1) >= model.gram_it_first_update and (it + 1) % model.gram_update_frequency == 0 and
  (cfg.gram.max_updates is None or num_gram_updates < cfg.gram.max_updates): model.update_gram();
  num_gram_updates += 1`."""
  done, expected_after, expected_before = 0, [], []
  for it in range(60):
    expected_before.append(done)
    due = (it + 1) >= first and (it + 1) % every == 0 and (max_updates == 0 or done < max_updates)
    expected_after.append(due)
    done += due
  steps = jnp.arange(60)
  kw = dict(first=first, every=every, max_updates=max_updates)
  np.testing.assert_array_equal(np.asarray(gram.refresh_after(steps, **kw)), expected_after)
  np.testing.assert_array_equal(np.asarray(gram.refreshes_before(steps, **kw)), expected_before)


@pytest.mark.parametrize("warmup, total, cosine", [(5, 20, None), (0, 10, None), (4, 30, 6), (1000, 1251, 1)])
def test_weight_schedule_matches_linear_warmup_cosine_decay(warmup, total, cosine):
  start, peak, end = (0.0, 0.0, 2.0) if warmup == 1000 else (0.1, 1.0, 0.3)
  linear = np.linspace(start, peak, warmup, endpoint=False)  # the official function, line by line
  c = total - warmup if cosine is None else cosine
  cos = (peak - end) * (np.cos(np.linspace(0, np.pi, c)) + 1) / 2 + end
  ref = np.concatenate([linear, cos, np.full((total - c - warmup,), end)])
  got = schedules.linear_warmup_cosine_constant(start, peak, end, warmup, total, cosine)(jnp.arange(total))
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)


_OFFICIAL_DRIVER = r"""
import importlib.util, json, sys
import numpy as np, torch
spec = importlib.util.spec_from_file_location("gram_loss", sys.argv[1])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
data = np.load(sys.argv[2])
out = {}
for img_level in (True, False):
  for name, kw in (("keep", {"remove_neg": False}), ("remove", {"remove_neg": True}),
                   ("teacher", {"remove_neg": False, "remove_only_teacher_neg": True})):
    loss = mod.GramLoss(apply_norm=True, **kw)
    s = torch.tensor(data["s"]); t = torch.tensor(data["t"])
    out[f"{img_level}-{name}"] = float(loss(s, t, img_level=img_level))
print(json.dumps(out))
"""


def test_gram_loss_matches_the_official_module_run_in_torch(feats, tmp_path):
  """The official dinov3/loss/gram_loss.py itself, in the torch venv (SIMDINO_TORCH_PYTHON, SIMDINO_OFFICIAL_DIR)."""
  python, official = os.environ.get("SIMDINO_TORCH_PYTHON"), os.environ.get("SIMDINO_OFFICIAL_DIR")
  source = os.path.join(official or "", "dinov3", "dinov3", "loss", "gram_loss.py")
  if not python or not os.path.exists(source):
    pytest.skip("needs SIMDINO_TORCH_PYTHON and SIMDINO_OFFICIAL_DIR/dinov3 (facebookresearch/dinov3)")
  s, t = (a.astype(np.float32) for a in feats)
  np.savez(tmp_path / "f.npz", s=s, t=t)
  run = subprocess.run(
    [python, "-c", _OFFICIAL_DRIVER, source, str(tmp_path / "f.npz")], capture_output=True, text=True
  )
  assert run.returncode == 0, run.stderr[-2000:]
  for key, value in json.loads(run.stdout).items():
    img_level, negatives = key.split("-")
    got = gram.gram_loss(jnp.asarray(s), jnp.asarray(t), img_level=img_level == "True", negatives=negatives)
    np.testing.assert_allclose(float(got), value, rtol=1e-5, err_msg=key)
