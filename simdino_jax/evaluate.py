"""Entry point: evaluate the newest checkpoint of a run.

python -m simdino_jax.evaluate --config=configs/FILE.py --workdir=DIR --eval=knn,linear,attention[,fewshot]
    [--which=teacher|student] [--config.FIELD=VALUE ...]

Restores the newest checkpoint of ``DIR/checkpoints`` onto the current devices (the Trainer's checkpointer and
abstract state, so any mesh reads what any mesh wrote), takes the teacher (default) or student backbone, extracts
the train and test features once for every feature evaluator, and writes (process 0):
  DIR/eval/knn.json        weighted k-NN, `accuracy` = top-1 at eval.knn_k, `per_k` top-1/top-5 for eval.knn_ks
                           (and `accuracy_at_init` from eval/knn_init.json when training wrote it)
  DIR/eval/linear.json     linear evaluation (eval.linear.protocol "frozen" or "dino", docs/evaluation.md):
                           `accuracy` = best lr's top-1, `lr`, `per_lr`, `protocol`, `epochs`, `features`
  DIR/eval/fewshot.json    few-shot logistic regression: `accuracy` = 5-shot mean, every setting's mean/std
  DIR/eval/attention.json  + DIR/eval/attention/*.png: last-layer cls attention maps and their 60%-mass masks
With --which=student the files are named <name>_student.json (and attention_student/).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from simdino_jax.config import EVALUATORS

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:ARG]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training directory whose newest checkpoint is evaluated.")
_EVAL = flags.DEFINE_list("eval", ["knn", "linear", "attention"], f"Evaluations to run, among {list(EVALUATORS)}.")
_WHICH = flags.DEFINE_enum("which", "teacher", ["teacher", "student"], "The backbone to evaluate.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_names(names) -> list[str]:
  """The evaluation names, deduplicated in order; ValueError listing the valid ones for an unknown name."""
  if isinstance(names, str):
    names = names.split(",")
  names = [n.strip() for n in names if n.strip()]
  unknown = [n for n in names if n not in EVALUATORS]
  if unknown or not names:
    raise ValueError(f"--eval: unknown evaluation(s) {unknown or names}; valid: {', '.join(EVALUATORS)}")
  return list(dict.fromkeys(names))


def restore(tr, workdir: str):
  """(state, step) of the newest usable checkpoint of ``workdir``; FileNotFoundError naming ``workdir`` if none."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):  # checked first: the Checkpointer would create the directory
    raise FileNotFoundError(f"no checkpoint to evaluate: {ckpt_dir} does not exist (train into --workdir={workdir} "
                            "first)")
  from simdino_jax.io import checkpointing

  with tr.checkpointer() as ckpt:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"no checkpoint to evaluate in {ckpt_dir} (workdir {workdir})")
    restored = ckpt.restore_latest(tr.abstract_state(), config=checkpointing.config_dict(tr.config))
  if restored is None:
    raise FileNotFoundError(f"no usable checkpoint in {ckpt_dir} (workdir {workdir}); see the warnings above")
  return restored


class _Head:
  """The first ``n`` examples of a source (a view, for eval_batches)."""

  def __init__(self, source, n: int):
    self.source, self.n = source, min(n, len(source))
    self.num_classes = source.num_classes

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, index):
    return self.source[index]


def attention_eval(tr, params, out_dir: str, test_src) -> dict:
  """Attention maps of the first config.eval.attention.num_images test images -> PNGs in ``out_dir``."""
  import jax
  from flax import nnx

  from simdino_jax.data import augment, pipeline
  from simdino_jax.evals import attention
  from simdino_jax.models.network import backbone_kwargs

  config = tr.config
  ac = config.eval.attention
  size = ac.image_size or config.eval.image_size or config.data.global_size
  subset = _Head(test_src, ac.num_images)

  def attn_fn(p, images):
    return nnx.merge(tr.graphdef, p).backbone(images, key=None, return_attention=True)["attention"]

  fn = jax.jit(attn_fn, in_shardings=(tr.state_sharding.teacher, tr.batch_sharding), out_shardings=tr.batch_sharding)
  attn, _ = tr.features(params, subset, fn, image_size=size)
  # The network's input, de-normalised for display (the same eval transform as the features).
  images = np.stack([pipeline.eval_transform(subset[i]["image"], size) for i in range(len(subset))])
  images = np.clip(np.round((images * augment.IMAGENET_STD + augment.IMAGENET_MEAN) * 255), 0, 255).astype(np.uint8)
  kw = backbone_kwargs(config.model)
  summary = attention.save_attention_maps(images, attn, out_dir, patch_size=kw["patch_size"],
                                          num_registers=kw["num_registers"], keep=ac.keep) \
      if jax.process_index() == 0 else {"num_images": len(subset)}
  return dict(summary, image_size=int(size))


def evaluate(config, workdir: str, names=("knn", "linear", "attention"), which: str = "teacher") -> dict:
  """Runs the evaluations ``names`` on the newest checkpoint of ``workdir``; returns {name: summary} (as written)."""
  names = parse_names(names)
  if which not in ("teacher", "student"):
    raise ValueError(f"--which: must be 'teacher' or 'student', got {which!r}")
  from simdino_jax.train import trainer

  tr = trainer.Trainer(config, workdir)  # validates the config (ConfigError naming the field) before any work
  state, step = restore(tr, workdir)
  params = state.teacher if which == "teacher" else state.student
  tr.log(f"evaluating the {which} backbone of {os.path.join(workdir, 'checkpoints', str(step))}: {', '.join(names)}")
  test_src = trainer.load_data(config, "test")
  suffix = "" if which == "teacher" else f"_{which}"
  eval_dir = os.path.join(workdir, "eval")
  if tr.is_main:
    os.makedirs(eval_dir, exist_ok=True)
  common = {"step": int(step), "features": f"{which} backbone"}

  results = {}
  feature_evals = [n for n in names if n != "attention"]
  if feature_evals:
    results.update(tr.run_evals(params, feature_evals, tr.train_source, test_src))
  if "knn" in results:
    r = results["knn"]
    results["knn"] = {"accuracy": r["top1"], "top5": r["top5"], "k": config.eval.knn_k,
                      "temperature": config.eval.knn_temperature, "per_k": r["per_k"],
                      "num_train": r["num_train"], "num_test": r["num_test"]}
    init_path = os.path.join(eval_dir, "knn_init.json")
    if which == "teacher" and os.path.exists(init_path):  # written by training: keep knn.json's init figures
      with open(init_path) as f:
        init = json.load(f)
      results["knn"].update(accuracy_at_init=init["top1"], top5_at_init=init["top5"])
  if "attention" in names:
    results["attention"] = attention_eval(tr, params, os.path.join(eval_dir, f"attention{suffix}"), test_src)

  for name in names:
    extra = dict(common)
    if "features" in results[name]:  # the linear evaluation's feature choice, after the backbone's name
      extra["features"] = f"{common['features']}: {results[name]['features']}"
    results[name] = dict(results[name], **extra)
    if tr.is_main:
      with open(os.path.join(eval_dir, f"{name}{suffix}.json"), "w") as f:
        json.dump(results[name], f, indent=2)
    tr.log(f"{name}: " + _summary(name, results[name]) + f" -> {os.path.join(eval_dir, f'{name}{suffix}.json')}")
  return results


def _summary(name: str, r: dict) -> str:
  if name == "knn":
    per_k = " ".join(f"k={k} {v['top1']:.2f}/{v['top5']:.2f}" for k, v in r["per_k"].items())
    return f"top-1 {r['accuracy']:.2f}% (k={r['k']}); top-1/top-5 {per_k}"
  if name == "linear":
    return (f"top-1 {r['accuracy']:.2f}% at lr {r['lr']:g} (best of {len(r['per_lr'])} lrs, {r['epochs']} epochs, "
            f"protocol {r.get('protocol', 'frozen')})")
  if name == "fewshot":
    return " ".join(f"{k} {v['mean']:.2f}+-{v['std']:.2f}%" for k, v in r["settings"].items())
  return (f"{r['num_images']} images, mean cls-attention entropy {r.get('mean_entropy', float('nan')):.3f} nats "
          f"(uniform {r.get('max_entropy', float('nan')):.3f})")


def main(argv):
  del argv
  from simdino_jax import sharding

  sharding.maybe_initialize_distributed()  # multi-host pods: before anything touches the devices
  try:
    evaluate(_CONFIG.value, _WORKDIR.value, _EVAL.value, _WHICH.value)
  except (ValueError, FileNotFoundError) as e:  # bad --eval, missing checkpoint, invalid config: one clear line
    sys.exit(f"simdino_jax.evaluate: error: {e}")


if __name__ == "__main__":
  from simdino_jax import tcmalloc

  tcmalloc.maybe_reexec("simdino_jax.evaluate")
  app.run(main)
