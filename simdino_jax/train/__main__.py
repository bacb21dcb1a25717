"""Entry point: python -m simdino_jax.train --config=configs/demo.py --workdir=DIR [--config.FIELD=VALUE ...]

Every config field can be overridden with --config.FIELD=VALUE; the fields, their defaults and meanings are in
simdino_jax/config.py (``base_config``) and the recipes in configs/. Exit codes: 0 trained (or already trained),
1 an error (one line naming the config field, file or workdir), 75 stopped by SIGTERM / SIGINT / a preemption notice
after saving a checkpoint (re-run the same command to resume).
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from simdino_jax import cli

EXIT_STOPPED = 75  # EX_TEMPFAIL: "try again later"; launch/*.sh treat it as "re-run to resume"

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Path to a config file (configs/*.py[:ARG]); override any field with --config.FIELD=VALUE "
  "(fields and defaults: simdino_jax/config.py, docs/training.md).",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
  "workdir",
  None,
  "Directory for config.json, metrics.jsonl, eval/ and checkpoints (relative paths and ~ are resolved; gs:// works).",
)
_FORCE = flags.DEFINE_bool(
  "force", False, "Take over the workdir's lock even when its owner (a run on another host) cannot be checked."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  # Imported after flag parsing: grain's worker processes need parsed absl flags.
  from simdino_jax import sharding  # pylint: disable=g-import-not-at-top
  from simdino_jax.errors import SimdinoError  # pylint: disable=g-import-not-at-top
  from simdino_jax.train import trainer  # pylint: disable=g-import-not-at-top

  sharding.maybe_initialize_distributed()  # multi-host pods: before anything touches the devices
  try:
    result = trainer.train(_CONFIG.value, _WORKDIR.value, force=_FORCE.value)
  except (SimdinoError, FileNotFoundError) as e:  # invalid config, locked workdir, bad data: one line, no traceback
    sys.exit(f"simdino_jax.train: error: {e}")
  if "stopped" in result:
    sys.exit(EXIT_STOPPED)


if __name__ == "__main__":
  from simdino_jax import tcmalloc  # pylint: disable=g-import-not-at-top  (stdlib only)

  tcmalloc.maybe_reexec("simdino_jax.train")
  app.run(main, flags_parser=cli.flags_parser("simdino_jax.train"))
