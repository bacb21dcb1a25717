"""Evaluator plug-ins: the registry of evaluator types, their config defaults and validation, and ``build``.

A config declares its evaluators as big_vision does: ``config.evals.NAME = dict(type=TYPE, every=N, ...)`` (fields
of TYPE, defaults from its class). ``every``: steps between runs during training (-1: ``config.eval_every``, 0: not
during training); ``final``: also run on the final teacher (DIR/eval/NAME.json); ``at_init``: also run on the network
at initialisation (DIR/eval/NAME_init.json, reported as ``*_at_init``). ``python -m simdino_jax.evaluate
--eval=NAME,...`` runs any of them on a checkpoint. Adding an evaluator = its file (a ``runner.Evaluator`` subclass)
+ one line in ``TYPES``.
"""

from __future__ import annotations

import ml_collections

from simdino_jax.errors import require
from simdino_jax.evals import (
  attention,
  davis,
  fewshot,
  finetune,
  knn,
  linear_eval,
  maskcut,
  retrieval,
  runner,
  segmentation,
  transfer,
)

TYPES: dict[str, type[runner.Evaluator]] = {
  "knn": knn.KnnEvaluator,
  "linear": linear_eval.LinearEvaluator,
  "fewshot": fewshot.FewshotEvaluator,
  "attention": attention.AttentionEvaluator,
  "davis": davis.DavisEvaluator,
  "segmentation": segmentation.SegmentationEvaluator,
  "retrieval": retrieval.RetrievalEvaluator,
  "maskcut": maskcut.MaskCutEvaluator,
  "finetune": finetune.FinetuneEvaluator,
  "transfer": transfer.TransferEvaluator,
}
COMMON = dict(every=0, final=False, at_init=False)  # fields every evaluator has (module docstring)


def declare(type_: str, **fields) -> ml_collections.ConfigDict:
  """config.evals entry of ``type_``: its defaults, the common fields, then ``fields``."""
  if type_ not in TYPES:
    raise ValueError(f"unknown evaluator type {type_!r}; choose one of {sorted(TYPES)}")
  return ml_collections.ConfigDict({"type": type_, **COMMON, **TYPES[type_].DEFAULTS, **fields})


def build(config, names=None) -> dict[str, runner.Evaluator]:
  """{name: evaluator} for ``names`` (default: every entry of config.evals), in the given order."""
  names = list(config.evals) if names is None else names
  return {name: TYPES[config.evals[name].type](name, config.evals[name], config) for name in names}


def validate(config, *, patch: int, depth: int, num_devices: int) -> None:
  """ConfigError naming ``config.evals.NAME.FIELD`` for an unknown type or field, or an invalid value."""
  for name, cfg in config.evals.items():
    field = f"evals.{name}"
    require(
      isinstance(cfg, ml_collections.ConfigDict) and cfg.get("type") in TYPES,
      f"{field}.type",
      f"must be one of {sorted(TYPES)}, got {cfg.get('type') if hasattr(cfg, 'get') else cfg!r}",
    )
    known = {"type", *COMMON, *TYPES[cfg.type].DEFAULTS}
    unknown = sorted(set(cfg) - known)
    require(not unknown, field, f"unknown field(s) {unknown} for type {cfg.type!r}; known: {sorted(known)}")
    missing = sorted(known - set(cfg))
    require(not missing, field, f"missing field(s) {missing} (declare it with evals.declare)")
    require(
      isinstance(cfg.every, int) and cfg.every >= -1,
      f"{field}.every",
      f"must be -1 (config.eval_every), 0 (not during training) or a number of steps, got {cfg.every!r}",
    )
    TYPES[cfg.type].validate(cfg, field, config=config, patch=patch, depth=depth, num_devices=num_devices)
