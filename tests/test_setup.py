"""train/setup.py, the one assembly: what it derives from (config, num_train), that it is the only place the
optimiser, the schedules and the loss are built, that it touches no workdir or data, and the two silently accepted
mistakes it and the trainer now refuse or name (issue 28, item 5)."""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simdino_jax.errors import ConfigError
from simdino_jax.evals import runner
from simdino_jax.io import checkpointing
from simdino_jax.train import setup, trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]


# -- derived values ---------------------------------------------------------------------------------------------------
def test_build_derives_durations_sizes_and_the_eval_batch_once(tiny_config):
  tiny_config.total_steps, tiny_config.warmup_steps, tiny_config.warmup_epochs = 0, 0, 2
  tiny_config.total_epochs = 3
  tiny_config.data.source = "folder:/nonexistent/never/opened"  # build reads no data
  s = setup.build(tiny_config, num_train=100)
  assert s.durations == setup.Durations(total_steps=36, warmup_steps=24, steps_per_epoch=12)  # 100 // 8 = 12
  assert s.process_batch == 8 // jax.process_count()
  assert (s.patch_size, s.num_patches, s.num_local_patches) == (4, 16, 4)  # mu/4 on 16 px and 8 px crops
  assert s.mask_positions == 0  # SimDINO masks nothing
  assert s.eval_batch == runner.device_batch(64)
  assert jax.tree_util.tree_structure(s.abstract_state) == jax.tree_util.tree_structure(jax.eval_shape(s.init_fn))


def test_the_eval_batch_is_rounded_down_to_the_devices_and_never_below_one_per_device():
  assert runner.device_batch(10, 4) == 8
  assert runner.device_batch(8, 4) == 8
  assert runner.device_batch(3, 4) == 4
  assert runner.device_batch(256, 1) == 256


def _official_cosine(base, final, total):
  """DINO utils.cosine_scheduler without warm-up, transcribed: final + 0.5 (base - final) (1 + cos(pi i / T))."""
  iters = np.arange(total)
  return final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))


@pytest.mark.parametrize("self_distillation", [True, False])
def test_teacher_momentum_follows_the_self_distillation_branch(tiny_config, self_distillation):
  tiny_config.teacher.self_distillation = self_distillation
  tiny_config.teacher.momentum, tiny_config.teacher.momentum_end = 0.99, 1.0
  s = setup.build(tiny_config, num_train=100)
  got = np.asarray([s.momentum_fn(i) for i in range(4)])
  want = _official_cosine(0.99, 1.0, 4) if self_distillation else np.zeros(4)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)


# -- one assembly ---------------------------------------------------------------------------------------------------
def _calls(path: pathlib.Path) -> list[str]:
  """The optimiser / schedule / loss constructions ``path`` calls (AST, so comments and names do not count)."""
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    if not isinstance(node, ast.Call):
      continue
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
    owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else None
    if name in ("make_optimizer", "lr_schedule", "wd_schedule", "make_loss") or (owner, name) == (
      "schedules",
      "cosine",
    ):
      found.append(f"{path.relative_to(ROOT)}:{name}")
  return found


def test_the_optimiser_schedules_and_loss_are_built_only_in_setup():
  paths = sorted([*(ROOT / "simdino_jax").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")])
  found = [c for p in paths for c in _calls(p)]
  # optim.py's one call is wd_schedule's own body (schedules.cosine): the definition, not an assembly.
  outside = [c for c in found if not c.startswith("simdino_jax/train/setup.py:") and c != "simdino_jax/optim.py:cosine"]
  assert "simdino_jax/train/setup.py:make_loss" in found
  assert outside == [], outside


def test_setup_touches_no_workdir_data_source_or_checkpoint():
  tree = ast.parse((ROOT / "simdino_jax" / "train" / "setup.py").read_text())
  imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
  for n in ast.walk(tree):
    if isinstance(n, ast.ImportFrom):
      imported |= {n.module} | {f"{n.module}.{a.name}" for a in n.names}
  banned = ("simdino_jax.train.trainer", "simdino_jax.io", "simdino_jax.workdir", "simdino_jax.data.sources")
  assert not [m for m in imported if m.startswith(banned)]


# -- mistakes that were silently accepted -----------------------------------------------------------------------------
def test_a_batch_larger_than_the_training_split_is_refused_even_with_total_steps(tiny_config, tmp_path):
  tiny_config.batch_size, tiny_config.total_steps = 4096, 4  # digits: 1,797 images
  with pytest.raises(ConfigError) as error:
    trainer.Trainer(tiny_config, str(tmp_path))
  message = str(error.value)
  assert message.startswith("config.batch_size: 4096 exceeds the ") and "\n" not in message
  split = int(message.split("exceeds the ")[1].split()[0])
  assert 0 < split < 4096 and f"lower it to at most {split}" in message


def test_a_resume_past_total_steps_says_so_and_goes_to_the_final_evaluation(tiny_config, tmp_path, capsys):
  tiny_config.total_steps = 2
  tiny_config.evals.knn.at_init = tiny_config.evals.knn.final = False  # no evaluation: what is measured is the loop
  tr = trainer.Trainer(tiny_config, str(tmp_path))
  # A checkpoint of step 3: a run trained further than this config's total (zeros: only its step is read here).
  state = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), tr.setup.abstract_state)
  with tr.checkpointer() as ckpt:
    ckpt.save(3, state.replace(step=jnp.asarray(3, jnp.int32)), checkpointing.config_dict(tiny_config))
    ckpt.wait()
  capsys.readouterr()
  result = trainer.Trainer(tiny_config, str(tmp_path)).run()
  said = [line for line in capsys.readouterr().out.splitlines() if "nothing to train" in line]
  expected = (
    "the checkpoint is at step 3, config.total_steps is 2: nothing to train, going straight to the final "
    "evaluation (raise config.total_steps to train further)"
  )
  assert said == [expected]
  assert result == {"step": 3}
  assert not (tmp_path / "metrics.jsonl").exists()  # no step ran, nothing was logged as trained
