"""A config file for ``--config``: the config a run stored in DIR/config.json, over today's defaults.

  python -m simdino_jax.evaluate --workdir=DIR ...   (evaluate passes --config=<this file>:DIR when --config is absent)
  python -m simdino_jax.evaluate --config=simdino_jax/stored_config.py:DIR --config.eval.batch_size=64 ...

so that evaluating a run reads its own data source, model and evaluator settings, and --config.FIELD overrides
still apply on top.
"""

from __future__ import annotations

import json

import ml_collections
from etils import epath

from simdino_jax import config as config_lib
from simdino_jax.errors import ConfigError

RUN_FILES = "config.json, checkpoints/, metrics.jsonl and eval/"  # what simdino_jax.train writes into its workdir


def get_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's stored config over today's defaults; ConfigError naming --workdir when DIR is not a run."""
  root = epath.Path(workdir)
  path = root / "config.json"
  if not root.exists():
    raise ConfigError(f"--workdir={workdir}: no such directory (give the --workdir a training run wrote into)")
  if not path.exists():
    raise ConfigError(
      f"--workdir={workdir} is not a training run's directory: a run holds {RUN_FILES}, and it has no config.json "
      "(give the --workdir simdino_jax.train wrote into, or name the data and evaluators with "
      "--config=configs/FILE.py)"
    )
  try:
    stored = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}: not a JSON config ({e})") from None
  return config_lib.from_dict(stored)
