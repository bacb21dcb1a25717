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


def get_config(workdir: str) -> ml_collections.ConfigDict:
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise ConfigError(
      f"config: {path} does not exist: --workdir is not a training run's directory, or pass --config=configs/FILE.py"
    )
  return config_lib.from_dict(json.loads(path.read_text()))
