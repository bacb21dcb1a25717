"""Entry point: python -m simdino_jax.train --config=configs/demo.py --workdir=/tmp/demo [--config.FIELD=VALUE]"""

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:ARG]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json, metrics.jsonl, eval/ and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from simdino_jax import sharding  # after flag parsing: grain workers need parsed absl flags
  from simdino_jax.train import trainer

  sharding.maybe_initialize_distributed()  # multi-host pods: before anything touches the devices

  trainer.train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  from simdino_jax import tcmalloc

  tcmalloc.maybe_reexec("simdino_jax.train")
  app.run(main)
