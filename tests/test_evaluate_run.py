"""evaluate.py on a run: its own stored config by default, training results never overwritten, --output; a failing
evaluator costs only its own result (the others are written, the command exits 1 with one line); --weights on our
own export gives the workdir's figures; and a run on unlabelled images (no labelled split: label-based evaluators
off, training goes on)."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from test_cli_errors import parse

from simdino_jax import evaluate
from simdino_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def npz_run(tmp_path_factory):
  """A 2-step run on an npz of 48 train / 24 test images (not the demo's digits): (workdir, npz path)."""
  from conftest import make_tiny_config

  root = tmp_path_factory.mktemp("npz_run")
  rng = np.random.default_rng(0)
  path = str(root / "data.npz")
  np.savez(
    path,
    train_images=rng.integers(0, 256, (48, 16, 16, 3), np.uint8),
    train_labels=np.arange(48) % 3,
    test_images=rng.integers(0, 256, (24, 16, 16, 3), np.uint8),
    test_labels=np.arange(24) % 3,
  )
  config = make_tiny_config()
  config.data.source = f"npz:{path}"
  config.total_steps = 2
  workdir = str(root / "run")
  trainer.train(config, workdir)
  return workdir, path


def _evaluate_status(monkeypatch, capsys, *args):
  """(exit status, stdout, the one-line error message) of ``python -m simdino_jax.evaluate ARGS``, in-process: the
  entry point's flags, parser and main as app.run calls them (test_cli_errors.parse); an exception other than the
  one-line SystemExit fails the test itself."""
  capsys.readouterr()  # only this command's output
  try:
    flag_values, rest = parse("simdino_jax.evaluate", list(args), monkeypatch)
    evaluate.main(rest, flag_values)
    status, message = 0, ""
  except SystemExit as e:
    status, message = (1, e.code) if isinstance(e.code, str) else (e.code or 0, "")
  out = capsys.readouterr()
  assert "Traceback" not in out.err, out.err[-3000:]
  return status, out.out, message


def _evaluate(monkeypatch, capsys, *args):
  status, stdout, message = _evaluate_status(monkeypatch, capsys, *args)
  assert status == 0, message
  return stdout


def test_evaluate_without_config_uses_the_runs_own_data_and_keeps_training_results(
  npz_run, tmp_path, monkeypatch, capsys
):
  workdir, path = npz_run
  trained = json.loads(open(os.path.join(workdir, "eval", "knn.json")).read())
  assert trained["data"] == f"npz:{path}" and trained["num_test"] == 24

  _evaluate(monkeypatch, capsys, f"--workdir={workdir}", "--eval=knn")  # no --config: DIR/config.json, the run's npz
  again = json.loads(open(os.path.join(workdir, "eval", "knn.json")).read())
  assert again["data"] == f"npz:{path}" and again["num_test"] == 24 and again["step"] == 2
  assert again["accuracy"] == trained["accuracy"] and again["accuracy_at_init"] == trained["accuracy_at_init"]

  # Another data source (the demo recipe's digits): training's knn.json is kept, the new result has its own file.
  _evaluate(
    monkeypatch,
    capsys,
    "--config=configs/demo.py",
    f"--workdir={workdir}",
    "--eval=knn",
    "--config.data.global_size=16",
  )
  assert json.loads(open(os.path.join(workdir, "eval", "knn.json")).read()) == again
  other = json.loads(open(os.path.join(workdir, "eval", "knn-step2-digits.json")).read())
  assert other["data"] == "digits" and other["num_test"] == 359 and "accuracy_at_init" not in other

  # --output: results elsewhere (a read-only workdir), the overrides of --config.FIELD on top of the stored config.
  _evaluate(
    monkeypatch, capsys, f"--workdir={workdir}", "--eval=knn", f"--output={tmp_path / 'out'}", "--config.evals.knn.k=5"
  )
  assert json.loads((tmp_path / "out" / "knn.json").read_text())["k"] == 5


def test_a_failing_evaluator_keeps_the_others_results_and_the_command_exits_with_one_line(
  npz_run, tmp_path, monkeypatch, capsys
):
  workdir, _ = npz_run
  out_dir = tmp_path / "out"
  # retrieval runs first and fails (its data folder does not exist: raised while it runs, not by validation).
  status, stdout, message = _evaluate_status(
    monkeypatch,
    capsys,
    f"--workdir={workdir}",
    "--eval=retrieval,knn",
    f"--output={out_dir}",
    f"--config.evals.retrieval.data_dir={tmp_path / 'absent'}",
  )
  assert status == 1, message
  assert sorted(os.listdir(out_dir)) == ["knn.json"]  # k-NN ran after the failure and was written
  knn = json.loads((out_dir / "knn.json").read_text())
  assert knn["step"] == 2 and knn["dtype"] == "float32" and knn["num_test"] == 24
  failure_lines = [line for line in stdout.splitlines() if "FAILED" in line]
  assert len(failure_lines) == 1 and failure_lines[0].startswith("retrieval: FAILED: MissingDataError: ")
  assert "absent" in failure_lines[0]
  assert "\n" not in message  # the one line the command exits with (a traceback fails in _evaluate_status)
  assert message.startswith("simdino_jax.evaluate: error: evaluator(s) retrieval failed, their figures are missing")


def test_weights_of_our_own_export_give_the_workdirs_knn(npz_run, tmp_path):
  from simdino_jax import export, stored_config

  workdir, _ = npz_run
  trained = json.loads(open(os.path.join(workdir, "eval", "knn.json")).read())
  path = str(tmp_path / "teacher.npz")
  export.export(workdir, path, fmt="npz")
  config = stored_config.get_config(workdir)  # the run's data and evaluators; the architecture comes from the file
  got = evaluate.evaluate_weights(config, path, ["knn"], output=str(tmp_path / "out"))["knn"]
  assert got["per_k"] == trained["per_k"] and got["accuracy"] == trained["accuracy"] and got["top5"] == trained["top5"]
  written = json.loads((tmp_path / "out" / "knn.json").read_text())
  assert written["weights"] == path and written["step"] == 2 and written["dtype"] == "float32"
  assert written["features"] == "backbone of teacher.npz" and "accuracy_at_init" not in written


@pytest.mark.parametrize(
  "args,message",
  [
    (["--weights=x.npz", "--workdir=y"], "name what to evaluate: --workdir=DIR (a run) or --weights=FILE, not both"),
    (["--weights=x.npz", "--config=configs/demo.py"], "--weights: name the directory for the results with --output"),
  ],
)
def test_weights_flag_errors_are_one_line(args, message, monkeypatch, capsys):
  status, _, got = _evaluate_status(monkeypatch, capsys, *args, "--eval=knn")
  assert status == 1 and "\n" not in got and got.startswith("simdino_jax.evaluate: error: "), got
  assert message in got


def test_unlabelled_flat_folder_trains_with_label_based_evaluation_off(tiny_config, tmp_path, capsys):
  rng = np.random.default_rng(1)
  os.makedirs(tmp_path / "images")
  for i in range(24):  # no split folders, no classes: self-supervised pre-training's usual data
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), np.uint8)).save(tmp_path / "images" / f"{i}.png")
  tiny_config.data.source = f"folder:{tmp_path / 'images'}"
  tiny_config.total_steps = 2
  result = trainer.train(tiny_config, str(tmp_path / "run"))
  out = capsys.readouterr().out
  assert "has no labelled train and test split: evaluators" in out and "knn" in out
  assert result == {"step": 2}
  assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
  assert not os.path.exists(tmp_path / "run" / "eval" / "knn.json")
