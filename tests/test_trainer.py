"""End to end: the trainer and the CLI write the contract's files; invalid configs are refused by field name."""

import json
import math
import os
import subprocess
import sys

import pytest
from test_cli_errors import assert_one_line, parse, run, train_main

from simdino_jax import config as config_lib
from simdino_jax.errors import ResumeError
from simdino_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_trainer_writes_config_metrics_and_knn(tiny_config, tmp_path):
  result = trainer.train(tiny_config, str(tmp_path))
  assert json.loads((tmp_path / "config.json").read_text())["method"] == "simdino"
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2, 3, 4]  # log_every=1: every step
  for key in ("loss", "align", "rate", "lr", "wd", "momentum", "grad_norm", "images_per_sec"):
    assert all(math.isfinite(r[key]) for r in records), key
  knn = json.loads((tmp_path / "eval" / "knn.json").read_text())
  assert knn == result
  assert 0 <= knn["accuracy"] <= 100 and 0 <= knn["accuracy_at_init"] <= 100
  assert knn["num_test"] == 359 and knn["num_train"] == 1438 and knn["step"] == 4  # every example once


def test_trainer_stops_on_non_finite_loss_naming_the_step(tiny_config, tmp_path):
  tiny_config.loss.gamma_rule = "fixed"
  tiny_config.loss.gamma = float("nan")
  with pytest.raises(trainer.NonFiniteLossError, match="at step 1"):
    trainer.train(tiny_config, str(tmp_path))


def test_a_diverged_run_restarts_from_a_named_checkpoint_with_a_lower_lr(tiny_config, tmp_path):
  tiny_config.total_steps, tiny_config.checkpoint_every, tiny_config.checkpoint_keep = 6, 1, 10
  tiny_config.optim.lr = 1e6  # explodes within a few steps
  tiny_config.evals.knn.at_init = False
  with pytest.raises(trainer.NonFiniteLossError) as e:
    trainer.train(tiny_config, str(tmp_path))
  bad = e.value.step
  assert 2 <= bad <= 6 and f"--config.restart_from_step={bad - 1}" in str(e.value)
  assert sorted(map(int, os.listdir(tmp_path / "checkpoints"))) == list(range(1, bad))  # none of the bad step
  # Re-running as it is would resume into the divergence: refused, with the instruction.
  with pytest.raises(ResumeError, match=rf"non-finite loss at step {bad}.*--config.restart_from_step"):
    trainer.train(tiny_config, str(tmp_path))
  tiny_config.restart_from_step, tiny_config.optim.lr = 1, 1e-3  # the first checkpoint, before the explosion
  result = trainer.train(tiny_config, str(tmp_path))
  assert result["step"] == 6 and not (tmp_path / "nonfinite.json").exists()
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and all(math.isfinite(r["loss"]) for r in records)
  kept = os.listdir(tmp_path / "checkpoints")
  assert {n.split(".")[0] for n in kept if ".superseded-" in n} == {str(s) for s in range(2, bad)}  # kept aside


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("method", "simclr", "config.method"),  # not a method here (byol is one since issue 30)
    ("batch_size", 0, "config.batch_size"),
    ("data.global_size", 18, "config.data.global_size"),
    ("data.local_size", 6, "config.data.local_size"),
    ("model.variant", "Q/16", "config.model.variant"),
    ("loss.groups", 3, "config.loss.groups"),
    ("loss.expansion", "both", "config.loss.expansion"),
    ("loss.gamma_rule", "magic", "config.loss.gamma_rule"),
    ("optim.clip_mode", "norm", "config.optim.clip_mode"),
    ("model.dtype", "float64", "config.model.dtype"),
    ("mesh", [("data", 3)], "config.mesh"),
  ],
)
def test_invalid_config_is_refused_with_the_field_name(tiny_config, tmp_path, field, value, match):
  tiny_config.update_from_flattened_dict({field: value})
  with pytest.raises(config_lib.ConfigError, match=match.replace(".", r"\.")):
    trainer.Trainer(tiny_config, str(tmp_path))
  assert not os.listdir(tmp_path)  # refused before writing (or compiling) anything


def test_batch_not_divisible_by_device_count_is_refused(tiny_config):
  tiny_config.batch_size = 9
  with pytest.raises(config_lib.ConfigError, match=r"config\.batch_size: 9 is not divisible by the 2 devices"):
    config_lib.validate(tiny_config, num_devices=2)


def test_unknown_data_source_is_a_clear_error(tiny_config, tmp_path):
  tiny_config.data.source = "imagenet"
  with pytest.raises(ValueError, match="imagenet"):
    trainer.Trainer(tiny_config, str(tmp_path))


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py")))
def test_every_config_file_is_valid(name):
  import runpy

  get_config = runpy.run_path(os.path.join(ROOT, "configs", name))["get_config"]
  # The CIFAR-10 recipes take their data as the argument (no data is read by validation).
  if name.startswith(("cifar10_", "own_images", "distill_")):
    config = get_config("/path/to/cifar10.tar")
  elif name == "dino_appendix.py":  # a row of the CIFAR-10 miniature (tests/test_appendix_rows.py checks every row)
    config = get_config("dino,/path/to/cifar10.tar")
  else:
    config = get_config()
  config_lib.validate(config, num_devices=8)


def test_cli_overrides_and_writes_files(tmp_path, monkeypatch, capsys):
  # In-process: the entry point's flags, parser and main as app.run calls them (test_cli_errors.parse); the
  # subprocess path (python -m, tcmalloc re-exec) is run by test_checkpointing.py's CLI runs.
  args = [
    "--config=configs/demo.py",
    f"--workdir={tmp_path}",
    "--config.total_steps=3",
    "--config.warmup_steps=1",
    "--config.log_every=1",
    "--config.batch_size=8",
    "--config.model.depth=1",
    "--config.model.embed_dim=24",
    "--config.head.hidden_dim=32",
    "--config.data.num_local=1",
    "--config.data.global_size=16",
    "--config.data.local_size=8",
  ]
  flag_values, rest = parse("simdino_jax.train", args, monkeypatch)
  train_main.main(rest, flag_values)  # returns (exit status 0)
  stdout = capsys.readouterr().out
  lines = stdout.splitlines()
  steps = [line for line in lines if line.startswith("step ")]
  # The first line's time includes compilation: no rate or ETA there; the next lines have both, and elapsed time.
  assert "compilation included" in steps[0] and "| ETA" not in steps[0] and "steps/s" not in steps[0]
  assert all("steps/s" in line and "ETA" in line and "elapsed" in line for line in steps[1:]) and len(steps) == 3
  assert any(line.startswith("knn at init: top-1") for line in lines) and "knn: top-1" in stdout
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["total_steps"] == 3 and config["model"]["depth"] == 1
  assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
  assert (tmp_path / "eval" / "knn.json").exists()


def test_cli_refuses_bad_override_before_compiling(tmp_path, monkeypatch):
  status, message = run(
    "simdino_jax.train",
    ["--config=configs/demo.py", f"--workdir={tmp_path}", "--config.data.global_size=30"],
    monkeypatch,
  )
  assert status != 0
  assert "config.data.global_size: 30 is not a positive multiple of the patch size 4" in message


@pytest.mark.parametrize(
  "override,message",
  [
    ("--config.model.dept=3", "config.model.dept: no such config field; did you mean config.model.depth?"),
    ("--config.model.depth=abc", "--config.model.depth=abc"),  # a value of the wrong type
    ("--config.data.global_size=30", "config.data.global_size: 30 is not a positive multiple"),  # invalid value
  ],
)
def test_cli_config_errors_are_one_line_without_traceback(tmp_path, monkeypatch, override, message):
  # In-process (test_cli_errors.run): an exception other than the one-line SystemExit would fail the test itself.
  status, got = run("simdino_jax.train", ["--config=configs/demo.py", f"--workdir={tmp_path}", override], monkeypatch)
  assert_one_line(status, got, "simdino_jax.train", message)


def test_train_help_says_where_the_config_fields_are_documented():
  out = subprocess.run(
    [sys.executable, "-m", "simdino_jax.train", "--help"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env=dict(os.environ, SIMDINO_NO_TCMALLOC="1"),
  )
  assert "simdino_jax/config.py" in out.stdout and "--[no]force" in out.stdout


def test_periodic_knn_is_logged_with_the_step(tiny_config, tmp_path):
  tiny_config.eval_every = 2
  tiny_config.log_every = 3
  trainer.train(tiny_config, str(tmp_path))
  records = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
  assert sorted(records) == [2, 3, 4]  # eval step 2 is logged; 4 is the end (final k-NN goes to eval/knn.json)
  assert 0 <= records[2]["knn_top1"] <= 100 and "knn_top1" not in records[3]
