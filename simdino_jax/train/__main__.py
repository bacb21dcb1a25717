"""Entry point: python -m simdino_jax.train --config=configs/demo.py --workdir=DIR [--config.FIELD=VALUE ...]

Every config field can be overridden with --config.FIELD=VALUE; the fields, their defaults and meanings are in
simdino_jax/config.py (``base_config``) and the recipes in configs/. Exit codes: 0 trained (or already trained),
1 an error (one line naming the config field, file, workdir or JAX_* variable; on every process of a multi-process
run), 75 stopped by SIGTERM / SIGINT / a preemption notice after saving a checkpoint (re-run the same command to
resume; on several processes every one stops at the same step). A second signal aborts without a checkpoint: the
process dies of that signal (a shell reports 143 for SIGTERM, 130 for SIGINT).
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from simdino_jax import cli

EXIT_STOPPED = 75  # EX_TEMPFAIL: "try again later"; launch/*.sh treat it as "re-run to resume"


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> flags.FlagValues:
  """This command's flags, defined when it runs (not at import: tests import main next to evaluate's flags)."""
  config_flags.DEFINE_config_file(
    "config",
    None,
    "Path to a config file (configs/*.py[:ARG]); override any field with --config.FIELD=VALUE "
    "(fields and defaults: simdino_jax/config.py, docs/training.md).",
    flag_values=flag_values,
    lock_config=True,
  )
  flags.DEFINE_string(
    "workdir",
    None,
    "Directory for config.json, metrics.jsonl, eval/ and checkpoints (relative paths and ~ are resolved; gs:// works).",
    flag_values=flag_values,
  )
  flags.DEFINE_bool(
    "force",
    False,
    "Take over the workdir's lock even when its owner (a run on another host) cannot be checked.",
    flag_values=flag_values,
  )
  flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)
  return flag_values


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
  del argv
  # Imported after flag parsing: grain's worker processes need parsed absl flags.
  from simdino_jax import sharding  # pylint: disable=g-import-not-at-top
  from simdino_jax.errors import SimdinoError  # pylint: disable=g-import-not-at-top
  from simdino_jax.train import trainer  # pylint: disable=g-import-not-at-top

  f = flag_values
  if not f.workdir.strip():  # "" would resolve to the working directory and train into it
    sys.exit("simdino_jax.train: error: --workdir is empty: name the run's directory, e.g. --workdir=/tmp/run")
  try:
    sharding.maybe_initialize_distributed()  # multi-host pods: before anything touches the devices
    result = trainer.train(f.config, f.workdir, force=f.force)
  except (SimdinoError, FileNotFoundError) as e:  # invalid config or JAX_* variable, locked workdir, bad data: one line
    sys.exit(f"simdino_jax.train: error: {cli.one_line(e)}")
  if "stopped" in result:
    sys.exit(EXIT_STOPPED)


if __name__ == "__main__":
  from simdino_jax import tcmalloc  # pylint: disable=g-import-not-at-top  (stdlib only)

  tcmalloc.maybe_reexec("simdino_jax.train")
  define_flags()
  app.run(main, flags_parser=cli.flags_parser("simdino_jax.train"))
