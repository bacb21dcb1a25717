"""A failing evaluator during training costs only its own figures: logged in one line, the other evaluators' results
kept and written, training goes on and its end lists the failures; a ConfigError (a setting that cannot work) stops
the run once the round's other evaluators have run."""

import json

import pytest

from simdino_jax.errors import ConfigError
from simdino_jax.evals import attention
from simdino_jax.train import trainer

# What XLA says when an evaluation does not fit (shortened): several lines, which the log must keep to one.
OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 120700195776 bytes.\nBufferAssignment OOM Debugging."


def test_training_goes_on_when_an_evaluator_fails_and_keeps_the_others_results(
  tiny_config, tmp_path, monkeypatch, capsys
):
  def out_of_memory(self, ctx, params, feats):
    raise RuntimeError(OOM)

  monkeypatch.setattr(attention.AttentionEvaluator, "run", out_of_memory)
  tiny_config.total_steps = 2
  tiny_config.evals.attention.every = 1  # periodic (step 1) and final (step 2): fails both times
  tiny_config.evals.attention.final = True
  workdir = tmp_path / "run"
  tr = trainer.Trainer(tiny_config, str(workdir))
  result = tr.run()
  out = capsys.readouterr().out

  assert result["step"] == 2 and "accuracy" in result  # the final k-NN, as without the failure
  assert sorted(p.name for p in (workdir / "eval").iterdir()) == ["knn.json", "knn_init.json"]
  assert json.loads((workdir / "eval" / "knn.json").read_text())["dtype"] == "float32"
  assert [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
  assert tr.eval_failures == {"attention": "step 2: RuntimeError: " + " ".join(OOM.split())}
  failures = [line for line in out.splitlines() if line.startswith("attention: FAILED")]
  assert failures == [f"attention: FAILED: RuntimeError: {' '.join(OOM.split())}"] * 2
  summary = [line for line in out.splitlines() if line.startswith("evaluators that failed in this run")]
  assert len(summary) == 1 and summary[0].endswith(f"--workdir={workdir} --eval=attention")


def test_a_config_error_in_an_evaluator_stops_training_after_the_others_ran(tiny_config, tmp_path, monkeypatch):
  def bad_setting(self, ctx, params, feats):
    raise ConfigError("config.evals.attention.num_images: more than the test split holds")

  monkeypatch.setattr(attention.AttentionEvaluator, "run", bad_setting)
  tr = trainer.Trainer(tiny_config, str(tmp_path / "run"))
  state = tr.init_state()
  done = {}
  evaluators = {"attention": tr.evaluators["attention"], "knn": tr.evaluators["knn"]}  # the failure first
  with pytest.raises(ConfigError, match="config.evals.attention.num_images"):
    tr.evaluate(state.teacher, evaluators, 0, on_result=lambda name, result: done.update({name: result}))
  assert list(done) == ["knn"] and "accuracy" in done["knn"]
