"""Co-adaptation sessions on a tiny model with scripted users: step order, turns, resets, self-checks, report."""

from __future__ import annotations

import json

import dspy
import pytest

from math_solver import MathSolver
from rosa2_dspy.coadapt import POLICIES, Session, SessionConfig
from rosa2_dspy.math.users import HintUser, Judgement, OracleUser, VagueUser
from rosa2_dspy.weights import UpdateConfig
from rosa2_dspy.words import Refinement

EXAMPLE = dspy.Example(problem="What is 2+3?", answer="5", unique_id="t/1", subject="Algebra",
                       level=1).with_inputs("problem")


class ScriptedUser:
    name = "scripted"

    def __init__(self, accept_at: int | None = None):
        self.accept_at = accept_at

    def judge(self, example, prediction, turn):
        ok = turn == self.accept_at
        return Judgement(ok, "ok" if ok else "hmm, not what I asked", ok, False)


class SpySession(Session):
    """Records which steps run, in order; the steps themselves are scripted."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def answer(self, conv, statement):
        self.calls.append("answer")
        return dspy.Prediction(answer="\\boxed{7}", reasoning="so \\boxed{7}"), "so \\boxed{7}"

    def words_step(self, conv, problem, history, feedback, revealed=None):
        self.calls.append("words")
        return Refinement(clarified_problem=f"{problem} (clarified {len(history)})", critique="unclear")

    def weights_step(self, conv, messages, rejected_replies, rejected, turn):
        self.calls.append("weights")
        return {"scripted": True}


EXPECTED = {
    "single": ["answer"],
    "whole": ["answer"],
    "retry": ["answer"] * 4,
    "pe": ["answer", "words"] * 3 + ["answer"],
    "ttt": ["answer", "weights"] * 3 + ["answer"],
    "pe-then-ttt": ["answer", "words", "answer", "words", "answer", "weights", "answer"],
    "rosa2": ["answer", "words", "weights"] * 3 + ["answer"],
}


@pytest.mark.parametrize("method", list(POLICIES))
def test_each_policy_calls_exactly_its_steps_in_order(tiny_engine, method):
    session = SpySession(MathSolver(), tiny_engine, method, ScriptedUser(), SessionConfig(turns=4))
    record = session.run(EXAMPLE)
    assert session.calls == EXPECTED[method]
    assert record["solved"] is False and record["error"] is None
    assert record["turns_used"] == (1 if POLICIES[method].single_turn else 4) == len(record["turns"])


@pytest.mark.parametrize("method", ["rosa2", "ttt", "retry"])
def test_words_after_first_rewrites_once_and_keeps_those_words(tiny_engine, method):
    session = SpySession(MathSolver(), tiny_engine, method, ScriptedUser(), SessionConfig(turns=4, words_after="first"))
    record = session.run(EXAMPLE)
    words = session.calls.index("words") + 1 if "words" in session.calls else 0
    assert session.calls == EXPECTED[method][:words] + [c for c in EXPECTED[method][words:] if c != "words"]
    assert session.calls.count("words") == (1 if method == "rosa2" else 0)
    if words:  # every later turn answers the one rewrite, on new weights (the scripted user reveals nothing)
        assert {t["statement"] for t in record["turns"][1:]} == {f"{EXAMPLE.problem} (clarified 1)"}


@pytest.mark.parametrize("method", ["pe", "pe-then-ttt"])
def test_words_after_first_is_refused_where_a_turn_would_repeat_the_last(tiny_engine, method):
    """Without an update after every later failed turn, kept words would ask the same prompt on the same weights."""
    from rosa2_dspy.experiments import parse_method

    with pytest.raises(ValueError, match="words_after=first needs a method that updates the weights after every"):
        SpySession(MathSolver(), tiny_engine, method, ScriptedUser(), SessionConfig(words_after="first"))
    with pytest.raises(ValueError, match=f"{method}: words_after=first needs"):
        parse_method(f"{method}@words_after=first")
    with pytest.raises(ValueError, match="words_after=first needs"):
        parse_method(method, {"words_after": "first"})  # the run's flag, not the variant's
    assert parse_method("rosa2", {"words_after": "first"}) == ("rosa2", {})


@pytest.mark.parametrize("method", ["ttt", "retry"])
def test_turns_stop_at_acceptance_and_ttt_and_retry_append_raw_feedback(tiny_engine, method):
    """retry is ttt without its update: the same prompts, turn by turn, answered by the same weights."""
    session = SpySession(MathSolver(), tiny_engine, method, ScriptedUser(accept_at=2), SessionConfig(turns=4))
    record = session.run(EXAMPLE)
    assert record["solved"] is True and record["turns_used"] == 2
    assert session.calls == (["answer", "weights", "answer"] if method == "ttt" else ["answer", "answer"])
    assert record["turns"][1]["statement"] == f"{EXAMPLE.problem}\n\nFeedback on the earlier answer(s): " \
        + record["turns"][0]["feedback"] and "hmm, not what I asked" in record["turns"][0]["feedback"]


def test_a_raising_step_is_recorded_and_the_next_problem_runs(tiny_engine):
    class Broken(SpySession):
        def words_step(self, conv, problem, history, feedback, revealed=None):
            raise RuntimeError("critic down")

    session = Broken(MathSolver(), tiny_engine, "pe", ScriptedUser(), SessionConfig(turns=3))
    record = session.run(EXAMPLE)
    assert "critic down" in record["error"] and record["solved"] is False
    assert session.run(EXAMPLE)["turns"][0]["turn"] == 1


class ReplySession(Session):
    def answer(self, conv, statement):
        return dspy.Prediction(answer="\\boxed{7}", reasoning="I add them: \\boxed{7}"), "I add them: \\boxed{7}"


@pytest.mark.parametrize("objective", [None, "kto"])
def test_weights_step_updates_then_the_adapter_is_back_at_zero(tiny_engine, objective):
    from rosa2_dspy.coadapt import session_update_config

    dspy.configure(lm=tiny_engine.lm(max_tokens=8, cache=False))
    update = session_update_config(objective=objective, steps=2, learning_rate=1e-2, max_length=128)
    session = ReplySession(MathSolver(), tiny_engine, "ttt", ScriptedUser(), SessionConfig(turns=2, samples=2,
                                                                                          max_tokens=8), update)
    first = session.run(EXAMPLE)
    weights = first["turns"][0]["weights"]
    assert weights["undesirable"] == 1 and weights["steps"] == 2
    assert weights["objective"] == (objective or "apo_zero_unpaired")
    assert first["l2_shift"] > 0
    second = session.run(EXAMPLE)
    assert second["turns"][0]["weights"]["shift_before"] == 0.0  # each conversation starts from the start weights
    session.close()
    assert session.updater.shift().total == 0.0  # and the session leaves the engine there


def test_desirable_samples_never_repeat_a_rejected_answer(tiny_engine, monkeypatch):
    from rosa2_dspy.engine import Completion

    from concurrent.futures import Future

    session = Session(MathSolver(), tiny_engine, "rosa2", ScriptedUser(), SessionConfig(samples=4))
    conv = session.begin(EXAMPLE)
    replies = iter(["\\boxed{7}", "so \\boxed{7}", "\\boxed{7}.", "\\boxed{5}",
                    "\\boxed{5}", "it is \\boxed{5}", "\\boxed{7}", "no box here"])
    asked = []

    def scripted(input_ids, settings, stop=()):
        asked.append(settings)
        future = Future()
        future.set_result(Completion(next(replies), 1, 1, "stop"))
        return future

    monkeypatch.setattr(tiny_engine, "submit", scripted)
    kept, checks = session.sample_desirable(conv, [{"role": "user", "content": "x"}], {"7"}, turn=1)
    assert kept == [] and all(not c["not_rejected"] for c in checks[:3])  # the majority was rejected
    # each sample has its own seed and asks for the conversation's weights
    assert len({s.seed for s in asked}) == 4 and {s.weights for s in asked} == {conv.weights}
    kept, checks = session.sample_desirable(conv, [{"role": "user", "content": "x"}], {"7"}, turn=2)
    assert kept == ["\\boxed{5}", "it is \\boxed{5}"]
    assert checks[3] == {"boxed": False, "parseable": False, "majority": False, "not_rejected": False}


def test_users_never_reveal_the_gold():
    example = dspy.Example(problem="p", answer="\\frac{3}{7}", unique_id="u/9").with_inputs("problem")
    wrong = dspy.Prediction(answer="\\boxed{0.43}")
    for user in (OracleUser(), VagueUser(seed=1), HintUser()):
        verdict = user.judge(example, wrong, turn=1)
        assert not verdict.accepted and "3}{7" not in verdict.feedback and "3/7" not in verdict.feedback
    assert VagueUser(1).judge(example, wrong, 2).feedback == VagueUser(1).judge(example, wrong, 2).feedback
    assert OracleUser().judge(example, None, 1).feedback == "Incorrect."
    assert "box" in HintUser().judge(example, None, 1).feedback.lower()
    assert OracleUser().judge(example, dspy.Prediction(answer="\\boxed{3/7}"), 1).accepted


def test_eval_method_resumes_and_bench_compare_builds_the_report(tmp_path, tiny_model_dir, capsys):
    from rosa2_dspy.cli import main

    out = tmp_path / "pe"
    common = ["eval", "--method", "pe", "--turns", "2", "--split", "test", "--limit", "2", "--model",
              str(tiny_model_dir), "--max-tokens", "8", "--no-progress", "--out", str(out)]
    assert main(common) == 0
    before = (out / "pe" / "results.jsonl").read_text()
    assert len(before.splitlines()) == 2
    assert main(common) == 0
    assert "resuming, 2 of 2" in capsys.readouterr().out
    assert (out / "pe" / "results.jsonl").read_text() == before  # finished problems are not rerun

    cmp = tmp_path / "cmp"
    assert main(["bench", "compare", "--methods", "single,ttt", "--limit", "2", "--turns", "2", "--samples", "2",
                 "--model", str(tiny_model_dir), "--max-tokens", "8", "--no-progress", "--out", str(cmp)]) == 0
    summary = json.loads((cmp / "summary.json").read_text())
    assert set(summary["methods"]) == {"single", "ttt"}
    assert summary["methods"]["single"]["problems"] == 2
    assert len(summary["methods"]["ttt"]["cumulative_accuracy_by_turn"]) == 2
    assert summary["methods"]["ttt"]["adaptation_over_generation_per_turn_machine"] > 0
    # the methods ran in one pool: each problem's turn 1, the same request for both, was generated once
    first = {m: {r["unique_id"]: r["turns"][0] for r in map(json.loads, (cmp / m / "results.jsonl").open())}
             for m in ("single", "ttt")}
    assert first["single"].keys() == first["ttt"].keys() and len(first["ttt"]) == 2
    for uid, turn in first["single"].items():
        assert turn["reply"] == first["ttt"][uid]["reply"]
        assert sorted([turn["generated_tokens"], first["ttt"][uid]["generated_tokens"]])[0] == 0
    assert json.loads((cmp / "config.json").read_text())["objective"] == "apo_zero_unpaired"  # the session default
    report = (cmp / "report.md").read_text()
    assert "| single |" in report and "| ttt |" in report
    assert (cmp / "accuracy_by_turn.png").stat().st_size > 1000
    (segment,) = [json.loads(line) for line in (cmp / "segments.jsonl").open()]  # where the records came from
    assert segment["outcome"] == "finished" and segment["items_left"] == 0 and segment["engine"]["steps"] > 0
    assert segment["code"] and segment["cpu"] and isinstance(segment["prepacked"], bool)
    assert "Ran in 1 segment (" in report and f"on CPU {segment['cpu']}" in report
    # the same folder with a smaller --limit reports only the problems asked for; another user is refused
    compare = ["bench", "compare", "--methods", "single,ttt", "--turns", "2", "--samples", "2", "--model",
               str(tiny_model_dir), "--max-tokens", "8", "--no-progress", "--out", str(cmp)]
    assert main([*compare, "--limit", "1"]) == 0
    assert json.loads((cmp / "summary.json").read_text())["methods"]["ttt"]["problems"] == 1
    capsys.readouterr()
    assert main([*compare, "--limit", "1", "--user", "oracle"]) == 2
    assert "user: 'vague' -> 'oracle'" in capsys.readouterr().err
    # a folder written before a setting existed ran with its default then: it resumes with that value, and another
    # is refused; clarify_check's default has changed since (strict, from lenient), so such a folder needs it said
    config = json.loads((cmp / "config.json").read_text())
    assert (config["lora_layers"], config["adapter_dtype"], config["clarify_check"]) == (None, "float32", "strict")
    (cmp / "config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                 if k not in ("lora_layers", "adapter_dtype", "clarify_check")}))
    assert main([*compare, "--limit", "1"]) == 2
    assert "clarify_check: 'lenient' -> 'strict'" in capsys.readouterr().err
    compare += ["--clarify-check", "lenient"]
    assert main([*compare, "--limit", "1"]) == 0
    capsys.readouterr()
    assert main([*compare, "--limit", "1", "--adapter-dtype", "model"]) == 2
    assert "adapter_dtype: 'float32' -> 'model'" in capsys.readouterr().err
    # activation checkpointing changes how an update runs, not what it gives: not part of the folder's identity
    assert main([*compare, "--limit", "1", "--activation-checkpointing", "--checkpointing-min-tokens", "512"]) == 0
    assert {"activation_checkpointing", "checkpointing_min_tokens"}.isdisjoint(
        json.loads((cmp / "config.json").read_text()))
    # the update over the replies' last 128 tokens became the default in session 22: a folder from before ran whole
    # rows, and resumes only when asked for them (--reply-tail 0: the whole reply, recorded as before, null)
    config = json.loads((cmp / "config.json").read_text())
    assert (config["frozen_prompt"], config["reply_tail"]) == (True, 128)
    (cmp / "config.json").write_text(json.dumps({k: v for k, v in config.items()
                                                 if k not in ("frozen_prompt", "reply_tail")}))
    assert main([*compare, "--limit", "1"]) == 2
    assert "frozen_prompt: False -> True, reply_tail: None -> 128" in capsys.readouterr().err
    assert main([*compare, "--limit", "1", "--no-frozen-prompt", "--reply-tail", "0"]) == 0
    config = json.loads((cmp / "config.json").read_text())
    assert (config["frozen_prompt"], config["reply_tail"]) == (False, None)


def test_the_adapter_flags_reach_the_weights_step():
    """--lora-layers, --adapter-dtype and --activation-checkpointing set the UpdateConfig every conversation's
    update uses; a variant may set checkpointing (it does not shape the adapter), as true or false."""
    from rosa2_dspy.cli.parser import build_parser
    from rosa2_dspy.experiments import parse_method, session_configs

    args = build_parser().parse_args(["bench", "compare", "--methods", "ttt", "--out", "x", "--lora-layers", "3",
                                      "--adapter-dtype", "model", "--activation-checkpointing"])
    _, update = session_configs(vars(args), max_tokens=args.max_tokens)
    assert (update.layers, update.adapter_dtype, update.activation_checkpointing) == (3, "model", True)
    assert update.checkpointing_min_tokens == 384  # large forwards only, unless asked
    args = build_parser().parse_args(["bench", "compare", "--methods", "ttt", "--out", "x",
                                      "--activation-checkpointing", "--checkpointing-min-tokens", "1024"])
    assert session_configs(vars(args), max_tokens=8)[1].checkpointing_min_tokens == 1024
    assert parse_method("ttt@checkpointing_min_tokens=256") == ("ttt", {"checkpointing_min_tokens": 256})
    default_session, default = session_configs(vars(build_parser().parse_args(["bench", "compare", "--out", "x"])),
                                               max_tokens=8)
    # a weights step trains on the rejected replies alone unless asked, as the train runs chose
    assert default_session.samples == 0
    args = build_parser().parse_args(["bench", "compare", "--out", "x", "--samples", "1"])
    assert session_configs(vars(args), max_tokens=8)[0].samples == 1
    assert (default.layers, default.adapter_dtype, default.activation_checkpointing) == (None, "float32", True)
    assert default.checkpointing_min_tokens == 384  # large forwards only: the rules of session 25 passed
    args = build_parser().parse_args(["bench", "compare", "--out", "x", "--no-activation-checkpointing"])
    assert session_configs(vars(args), max_tokens=8)[1].activation_checkpointing is False
    assert parse_method("ttt@activation_checkpointing=true") == ("ttt", {"activation_checkpointing": True})
    assert parse_method("ttt@activation_checkpointing=0") == ("ttt", {"activation_checkpointing": False})
    with pytest.raises(ValueError, match="activation_checkpointing takes a bool"):
        parse_method("ttt@activation_checkpointing=maybe")
    # --frozen-prompt changes what an update computes: a variant may set it, and a run folder records it
    args = build_parser().parse_args(["bench", "compare", "--methods", "ttt", "--out", "x", "--frozen-prompt"])
    assert default.frozen_prompt is True  # the session's default since session 22 (BENCHMARKS.md)
    args = build_parser().parse_args(["bench", "compare", "--methods", "ttt", "--out", "x", "--no-frozen-prompt"])
    assert session_configs(vars(args), max_tokens=8)[1].frozen_prompt is False
    assert parse_method("rosa2@frozen_prompt=true") == ("rosa2", {"frozen_prompt": True})
    # --reply-tail N likewise (the whole reply by default)
    args = build_parser().parse_args(["bench", "compare", "--methods", "ttt", "--out", "x", "--reply-tail", "96"])
    assert session_configs(vars(args), max_tokens=8)[1].reply_tail == 96 and default.reply_tail == 128
    args = build_parser().parse_args(["bench", "compare", "--methods", "ttt", "--out", "x", "--reply-tail", "0"])
    assert session_configs(vars(args), max_tokens=8)[1].reply_tail is None  # 0: the whole reply
    assert session_configs({"objective": "sft"}, max_tokens=8)[1].reply_tail == 128  # kept; sft ignores it
    # --prefix-per-row (off: one prefix per batch, the split the train rule chose) and its variant
    args = build_parser().parse_args(["bench", "compare", "--methods", "ttt", "--out", "x", "--prefix-per-row"])
    assert session_configs(vars(args), max_tokens=8)[1].prefix_per_row is True and default.prefix_per_row is False
    assert parse_method("rosa2@prefix_per_row=true") == ("rosa2", {"prefix_per_row": True})
    assert parse_method("ttt@reply_tail=128@frozen_prompt=true") == ("ttt", {"reply_tail": 128, "frozen_prompt": True})


def test_a_variant_runs_beside_its_method_with_its_own_setting(tmp_path, lively_model_dir):
    """`ttt@learning_rate=...` runs in the same pool as `ttt`, in its own folder, with its own updater, and the
    report pairs it with the others."""
    from rosa2_dspy.cli import main

    out = tmp_path / "variants"
    assert main(["bench", "compare", "--methods", "single,ttt,ttt@learning_rate=0.02", "--split", "test", "--level",
                 "1", "--limit", "3", "--turns", "2", "--samples", "0", "--user", "sharded", "--model",
                 str(lively_model_dir), "--dtype", "float32", "--max-tokens", "12", "--no-progress",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"]["ttt@learning_rate=0.02"]["problems"] == 3
    assert {"single - ttt", "single - ttt@learning_rate=0.02"} <= set(summary["paired"])
    records = {m: [json.loads(line) for line in (out / m / "results.jsonl").open()]
               for m in ("ttt", "ttt@learning_rate=0.02")}
    assert {r["method"] for r in records["ttt@learning_rate=0.02"]} == {"ttt@learning_rate=0.02"}
    shifts = {m: sum(r["l2_shift"] for r in rs) for m, rs in records.items()}
    assert shifts["ttt@learning_rate=0.02"] > 10 * shifts["ttt"] > 0  # 100x the learning rate, a larger step


def test_rosa2_compile_interleaves_words_and_weights(tiny_engine):
    from test_words import critic, script_lm

    from rosa2_dspy.teleprompt import ROSA2

    lm = tiny_engine.lm(pinned=True, max_tokens=8, cache=False)
    dspy.configure(lm=lm)
    critic_lm, critic_engine = script_lm(critic("improve"))
    train = [dspy.Example(problem=f"What is {i}+{i}?", answer=str(2 * i), solution=f"{i}+{i}={2 * i}, "
                          f"so \\boxed{{{2 * i}}}", unique_id=f"u{i}").with_inputs("problem") for i in range(1, 5)]
    optimizer = ROSA2(critic_lm=critic_lm, rounds=2, minibatch_size=2, val_size=2, num_threads=2,
                      sources=("solutions",), config=UpdateConfig(objective="sft", steps=2, batch_size=2,
                                                                  learning_rate=1e-2, max_length=128))
    program = MathSolver()
    program.set_lm(lm)
    compiled = optimizer.compile(program, trainset=train)
    assert [h["round"] for h in optimizer.history] == [1, 2]
    assert critic_engine.calls  # the words step asked the critic in each round
    shifts = [h["l2_shift"] for h in optimizer.history]
    assert 0 < shifts[0] < shifts[1]  # each round's weights step moved the adapter further
    # without a valset, 2 problems are held out once: the same validation problems every round, never trained on
    first = optimizer.history[0]
    assert len(first["val_ids"]) == 2 and sorted(first["train_ids"] + first["val_ids"]) == ["u1", "u2", "u3", "u4"]
    assert all((h["val_ids"], h["train_ids"]) == (first["val_ids"], first["train_ids"]) for h in optimizer.history)
    assert all(h["weights"]["solution_rows"] == 2 for h in optimizer.history)
    assert compiled.words_history is optimizer.history


@pytest.mark.parametrize("validation", ["rises", "falls", "rises then falls"])
def test_rosa2_compile_gate_keeps_a_weights_step_only_when_validation_rises(tiny_engine, monkeypatch, validation):
    """With ``gate_weights`` a round's weights step stays only when it scores better on validation than the
    words it started from; otherwise the adapter goes back, bit for bit, to where the round found it, and the
    compiled program answers with those weights. The validation score here is the adapter's shift: every
    weights step raises it ("rises"), or its negative ("falls"), or it rises up to round 1's shift and falls
    beyond it ("rises then falls": round 1 kept, round 2 undone)."""
    import torch
    from test_words import critic, script_lm

    from rosa2_dspy.teleprompt import ROSA2, engine_shift

    lm = tiny_engine.lm(pinned=True, max_tokens=8, cache=False)
    dspy.configure(lm=lm)
    critic_lm, _ = script_lm(critic("improve"))
    train = [dspy.Example(problem=f"What is {i}+{i}?", answer=str(2 * i), solution=f"so \\boxed{{{2 * i}}}",
                          unique_id=f"u{i}").with_inputs("problem") for i in range(1, 5)]
    optimizer = ROSA2(critic_lm=critic_lm, rounds=2, minibatch_size=2, val_size=2, num_threads=2,
                      sources=("solutions",), gate_weights=True,
                      config=UpdateConfig(objective="sft", steps=1, batch_size=2, learning_rate=1e-2, max_length=128))
    scored, first = [], {}

    def score(program, examples):  # what the words step and the gate both read
        shift = engine_shift(tiny_engine)
        if validation == "falls":
            shift = -shift
        elif validation == "rises then falls":
            if shift > 0 and not first:
                first.update(shift=shift, state=tiny_engine.snapshot())
            shift = shift if shift <= first.get("shift", 0) else -shift
        scored.append(shift)
        return shift

    monkeypatch.setattr(optimizer.words, "score", score)
    program = MathSolver()
    program.set_lm(lm)
    compiled = optimizer.compile(program, trainset=train)
    history = optimizer.history
    assert all(h["weights"]["update"] is not None for h in history)  # each round did train
    state = tiny_engine.snapshot()
    if validation == "rises":
        assert [h["weights_kept"] for h in history] == [True, True]
        assert 0 < history[0]["l2_shift"] < history[1]["l2_shift"]
        assert history[1]["val_before_weights"] == history[0]["val_score"] == history[0]["l2_shift"]
    elif validation == "falls":
        assert [h["weights_kept"] for h in history] == [False, False]
        assert all(h["val_after_weights"] < h["val_before_weights"] == h["val_score"] == 0 for h in history)
        assert all(h["l2_shift"] == 0 for h in history)
        tiny_engine.reset_adapter()
        pristine = tiny_engine.snapshot()
        assert state and all(torch.equal(state[name], pristine[name]) for name in pristine)  # back bit for bit
    else:
        assert [h["weights_kept"] for h in history] == [True, False]
        assert history[1]["l2_shift"] == history[0]["l2_shift"] > 0
        assert all(torch.equal(state[name], first["state"][name]) for name in state)  # round 1's, bit for bit
    # the compiled program answers with the weights the gate kept
    assert {p.lm.pinned_weights for p in compiled.predictors()} == {tiny_engine.weights_id}
    # the gate reads the words step's own last score: per round, the words' baseline, any candidate, the weights
    candidates = sum(e["score_candidate"] is not None for h in history for e in h["words"])
    assert len(scored) == 2 * len(history) + candidates


def test_rosa2_compile_trains_each_round_under_that_rounds_words(tiny_engine, monkeypatch):
    """The interleaving test above cannot tell which words the weights trained under (with a random student
    every rewrite is rejected). Here each round's words step accepts a rewrite, and every row the weights step
    trains on must carry that round's instructions."""
    from rosa2_dspy.teleprompt import ROSA2
    from rosa2_dspy.weights import LoRAUpdater

    lm = tiny_engine.lm(pinned=True, max_tokens=8, cache=False)
    dspy.configure(lm=lm)
    train = [dspy.Example(problem=f"What is {i}+{i}?", answer=str(2 * i), solution=f"so \\boxed{{{2 * i}}}",
                          unique_id=f"u{i}").with_inputs("problem") for i in range(1, 4)]
    optimizer = ROSA2(rounds=2, val_size=2, num_threads=2, sources=("solutions",),
                      config=UpdateConfig(objective="sft", steps=1, batch_size=2, learning_rate=1e-2, max_length=128))
    rounds = iter(range(1, 10))

    def rewrite(program, trainset, valset=None):  # a words step that accepts a rewrite every round
        words = f"Solve it step by step. Words of round {next(rounds)}."
        for _, predictor in program.named_predictors():
            if "answer" in predictor.signature.output_fields:
                predictor.signature = predictor.signature.with_instructions(words)
        return program

    monkeypatch.setattr(optimizer.words, "compile", rewrite)
    trained, update = [], LoRAUpdater.update

    def spy(self, rows, *args, **kwargs):
        trained.append([row["prompt"][0]["content"] for row in rows])
        return update(self, rows, *args, **kwargs)

    monkeypatch.setattr(LoRAUpdater, "update", spy)
    program = MathSolver()
    program.set_lm(lm)
    optimizer.compile(program, trainset=train)
    assert len(trained) == 2 and all(len(rows) == 2 for rows in trained)  # 3 problems, 1 held out to validate
    for round_index, systems in enumerate(trained, 1):
        assert all(f"Words of round {round_index}." in system for system in systems), systems[0][-200:]


def test_every_shipped_recipe_builds(tiny_engine):
    from pathlib import Path

    from rosa2_dspy.recipes import build_optimizer, load_recipe

    root = Path(__file__).resolve().parents[1] / "optimizers"
    built = {name: type(build_optimizer(load_recipe(root / f"{name}.toml"), tiny_engine)).__name__
             for name in ("lora", "words", "gepa", "rosa2-compile", "p-then-w", "better-together")}
    assert built == {"lora": "LoRAFinetune", "words": "TextualGradientOptimizer", "gepa": "GEPA",
                     "rosa2-compile": "ROSA2", "p-then-w": "Sequential", "better-together": "BetterTogether"}
    # every words step runs as many program calls in flight as the command's --threads, with the same settings
    words = {name: build_optimizer(load_recipe(root / f"{name}.toml"), tiny_engine, num_threads=6)
             for name in ("words", "p-then-w", "rosa2-compile")}
    steps = [words["words"], words["p-then-w"].p, words["rosa2-compile"].words]
    assert {(s.num_threads, s.val_size, s.format_credit) for s in steps} == {(6, 16, 0.05)}
    # every recipe that trains keeps its activations small enough for the 1.5B default in 24 GB
    from rosa2_dspy.recipes import update_config

    training = {name: update_config(load_recipe(root / f"{name}.toml"))
                for name in ("lora", "rosa2-compile", "p-then-w", "better-together")}
    assert {name: c.activation_checkpointing for name, c in training.items()} == dict.fromkeys(training, True)


def test_a_recipe_extends_another_and_overrides_only_what_it_names(tiny_engine, tmp_path):
    """rosa2-compile-gated is rosa2-compile with the gate on: every other setting comes from the base, and the
    recipe's text (what an artifact is checked against) changes when the base does."""
    from pathlib import Path

    from rosa2_dspy.recipes import RecipeError, build_optimizer, load_recipe

    root = Path(__file__).resolve().parents[1] / "optimizers"
    base, gated = load_recipe(root / "rosa2-compile.toml"), load_recipe(root / "rosa2-compile-gated.toml")
    assert gated.kind == base.kind == "rosa2" and gated.update == base.update and gated.critic == base.critic
    assert gated.optimizer == {**base.optimizer, "gate_weights": True}
    built = {name: build_optimizer(r, tiny_engine) for name, r in (("base", base), ("gated", gated))}
    assert (built["base"].gate_weights, built["gated"].gate_weights) == (False, True)
    (tmp_path / "a.toml").write_text("[optimizer]\nkind = 'lora'\n[optimizer.p]\nx = 1\ny = 2\n"
                                     "[update]\nsteps = 3\nrank = 4\n")
    (tmp_path / "b.toml").write_text("extends = 'a.toml'\n[optimizer.p]\ny = 3\n[update]\nsteps = 5\n")
    before = load_recipe(tmp_path / "b.toml")
    assert before.update == {"steps": 5, "rank": 4} and before.optimizer == {"p": {"x": 1, "y": 3}}
    (tmp_path / "a.toml").write_text("[optimizer]\nkind = 'lora'\n[update]\nsteps = 3\nrank = 8\n")
    assert load_recipe(tmp_path / "b.toml").text != before.text
    (tmp_path / "a.toml").write_text("extends = 'b.toml'\n")
    with pytest.raises(RecipeError, match="in a loop"):
        load_recipe(tmp_path / "b.toml")
    (tmp_path / "c.toml").write_text("extends = 'missing.toml'\n")
    with pytest.raises(RecipeError, match="no recipe at"):
        load_recipe(tmp_path / "c.toml")


def test_bench_compile_runs_each_recipe_and_the_baseline(tmp_path, tiny_model_dir, capsys):
    import shutil

    from rosa2_dspy.cli import main

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    recipe = tmp_path / "lora.toml"
    recipe.write_text("[optimizer]\nkind = 'lora'\nsources = ['solutions']\n[update]\nobjective = 'sft'\nsteps = 2\n"
                      "batch_size = 2\nlearning_rate = 0.01\nmax_length = 128\n")
    broken = tmp_path / "broken.toml"  # compiles and then fails: a result, not the end of the run
    broken.write_text("[optimizer]\nkind = 'lora'\nsources = ['bootstrap']\nkeep = 'nonsense'\n")
    out = tmp_path / "cmp"
    args = ["bench", "compile", "--recipes", f"{recipe},{broken}", "--limit", "2", "--eval-limit", "2", "--model", str(model),
            "--max-tokens", "8", "--threads", "2", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    written = json.loads((out / "summary.json").read_text())
    summary = written["methods"]
    assert list(summary) == ["baseline", "lora", "broken"] and "keep" in summary["broken"]["error"]
    assert summary["baseline"]["adapter_l2_shift"] == 0.0 and summary["lora"]["adapter_l2_shift"] > 0
    assert summary["lora"]["problems"] == 2
    # paired against the baseline on the same problems, from the records (a tiny model solves nothing: no
    # discordant problem), and the run's segment: command, code, outcome
    assert list(written["paired"]) == ["lora - baseline"]
    assert written["paired"]["lora - baseline"] == {"problems": 2, "difference": 0.0, "ci95": [0.0, 0.0],
                                                    "a_only": 0, "b_only": 0, "mcnemar_p": 1.0}
    report = (out / "report.md").read_text()
    assert "| lora |" in report and "| lora - baseline | 2 | +0.0% (+0.0% to +0.0%) | 0 | 0 | 1 |" in report
    assert "Ran in 1 segment" in report and report.count("(segments.jsonl)") == 1
    assert (out / "compile_methods.png").exists()
    segments = [json.loads(line) for line in (out / "segments.jsonl").read_text().splitlines()]
    assert segments[-1]["code"] and segments[-1]["outcome"] == "finished"
    compiled_at = (out / "lora" / "artifact" / "compile.json").stat().st_mtime
    assert main(args) == 0  # resume: the artifact is reused, not recompiled
    assert (out / "lora" / "artifact" / "compile.json").stat().st_mtime == compiled_at
    adapter = out / "lora" / "artifact" / json.loads((out / "lora" / "artifact" / "compile.json").read_text())["adapter"]
    shutil.rmtree(adapter)  # a folder packed without its adapters: an evaluation already through needs none
    assert main(args) == 0
    assert json.loads((out / "summary.json").read_text())["methods"]["lora"]["problems"] == 2
    recipe.write_text(recipe.read_text().replace("steps = 2", "steps = 3"))  # edited: its artifact is stale
    assert main(args) == 2
    assert "changed since" in capsys.readouterr().err
    assert (out / "lora" / "artifact" / "compile.json").stat().st_mtime == compiled_at
    shutil.rmtree(out / "lora" / "artifact")  # results left without the artifact they came from: refused
    assert main(args) == 2
    assert "holds evaluation results but no compiled artifact" in capsys.readouterr().err
    twin = tmp_path / "other"
    twin.mkdir()
    shutil.copy(recipe, twin / "lora.toml")  # two recipes named lora would share one folder
    assert main([*args[:3], f"{recipe},{twin / 'lora.toml'}", *args[4:]]) == 2
    assert "share the folder 'lora'" in capsys.readouterr().err


def test_bench_compile_stops_between_phases_on_usr1(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """kill -USR1 during a compile: that compile finishes and is saved, nothing more runs; the same command then
    goes on from there, the artifact reused."""
    import os
    import shutil
    import signal

    from rosa2_dspy import experiments
    from rosa2_dspy.cli import main

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    recipes = []
    for name in ("first", "second"):
        recipe = tmp_path / f"{name}.toml"
        recipe.write_text("[optimizer]\nkind = 'lora'\nsources = ['solutions']\n[update]\nobjective = 'sft'\n"
                          "steps = 1\nbatch_size = 2\nlearning_rate = 0.01\nmax_length = 128\n")
        recipes.append(str(recipe))
    compile_program = experiments.compile_program

    def signalled(*args, **kwargs):  # the signal arrives while the first compile runs
        os.kill(os.getpid(), signal.SIGUSR1)
        return compile_program(*args, **kwargs)

    monkeypatch.setattr(experiments, "compile_program", signalled)
    out = tmp_path / "cmp"
    args = ["bench", "compile", "--recipes", ",".join(recipes), "--limit", "2", "--eval-limit", "2", "--model",
            str(model), "--max-tokens", "8", "--threads", "2", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    assert "stopped after compiling first" in capsys.readouterr().err
    assert (out / "baseline" / "results.jsonl").is_file() and (out / "first" / "artifact" / "compile.json").is_file()
    assert not (out / "first" / "results.jsonl").exists() and not (out / "second").exists()
    assert json.loads((out / "segments.jsonl").read_text().splitlines()[-1])["outcome"] == "stopped early"
    assert list(json.loads((out / "summary.json").read_text())["methods"]) == ["baseline"]
    compiled_at = (out / "first" / "artifact" / "compile.json").stat().st_mtime
    monkeypatch.setattr(experiments, "compile_program", compile_program)
    assert main(args) == 0
    assert (out / "first" / "artifact" / "compile.json").stat().st_mtime == compiled_at
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["methods"]) == ["baseline", "first", "second"]
    assert all(s["problems"] == 2 for s in summary["methods"].values())
    assert json.loads((out / "segments.jsonl").read_text().splitlines()[-1])["outcome"] == "finished"


def test_concurrent_conversations_match_sequential_ones(tiny_engine):
    """Each conversation adapts its own weights; run side by side they give the records they give alone."""
    from concurrent.futures import ThreadPoolExecutor

    dspy.configure(lm=tiny_engine.lm(max_tokens=8, cache=False))
    update = UpdateConfig(objective="kto", steps=1, batch_size=2, learning_rate=5e-2, max_length=128)
    class RawSession(Session):  # the tiny model's reply, unparsed: the rejected reply to train on
        def answer(self, conv, statement):
            text = f"My answer: {conv.lm(statement)[0]}"
            return dspy.Prediction(answer=None, reasoning=text), text

    session = RawSession(MathSolver(), tiny_engine, "ttt", OracleUser(),
                         SessionConfig(turns=3, samples=2, max_tokens=8), update)
    examples = [dspy.Example(problem=f"What is {i}+{i}?", answer=str(2 * i), unique_id=f"t/{i}").with_inputs("problem")
                for i in range(1, 4)]
    pins_before = set(tiny_engine._pins)

    def essentials(record):
        return ([(t["statement"], t["reply"], (t["weights"] or {}).get("update_shift")) for t in record["turns"]],
                record["l2_shift"], record["error"])

    alone = [essentials(session.run(ex)) for ex in examples]
    assert all(shift > 0 for _, shift, _ in alone) and all(error is None for *_, error in alone)
    tiny_engine.batch_window = 0.1
    mixed_before = tiny_engine.stats["mixed_weights_batches"]
    with ThreadPoolExecutor(3) as pool:
        together = [essentials(r) for r in pool.map(session.run, examples)]
    assert together == alone
    assert tiny_engine.stats["mixed_weights_batches"] > mixed_before  # conversations shared batches
    assert set(tiny_engine._pins) == pins_before  # every conversation let go of its weights
    session.close()
    session.close()  # idempotent
    assert session.updater.shift().total == 0.0  # the engine is back at the starting weights
    assert not tiny_engine._pins  # the session's hold on its starting weights is released


def test_the_words_step_critiques_with_the_conversations_own_weights(tiny_engine, monkeypatch):
    """Not DSPy's configured LM, which follows whatever weights the engine holds while other
    conversations update theirs."""
    import rosa2_dspy.words as words

    dspy.configure(lm=tiny_engine.lm(max_tokens=8, cache=False))
    critics = []

    def spy(module, problem, history, feedback, critic_lm=None, **kwargs):
        critics.append(critic_lm.model)
        return Refinement(clarified_problem=problem, critique="")

    monkeypatch.setattr(words, "refine", spy)
    session = Session(MathSolver(), tiny_engine, "pe", OracleUser(), SessionConfig(turns=2, samples=0, max_tokens=4))
    conv = session.begin(dspy.Example(problem="What is 1+1?", answer="2", unique_id="t/1").with_inputs("problem"))
    try:
        session.words_step(conv, "What is 1+1?", [], "no")
        assert critics == [conv.lm.model] and conv.lm.pinned_weights == conv.weights
    finally:
        session.end(conv)


def test_the_report_reads_adaptation_cost_per_turn_in_wall_and_machine_time():
    from rosa2_dspy.report import summarize_sessions

    def turn(gen_tokens, wall, machine, adapted):
        return {"boxed": False, "generated_tokens": gen_tokens, "words": {"x": 1} if adapted else None,
                "weights": None, "seconds": dict(zip(("generation", "words", "weights"), wall)),
                "compute_seconds": dict(zip(("generation", "words", "weights"), machine))}

    record = {"solved": False, "turns_used": 3, "seconds": 30.0, "l2_shift": 0.0,
              "seconds_split": {"generation": 14.0, "words": 12.0, "weights": 0.0},
              "turns": [turn(0, (0.0, 4.0, 0.0), (0.0, 1.0, 0.0), True),  # turn 1 came from the cache
                        turn(100, (6.0, 8.0, 0.0), (2.0, 3.0, 0.0), True),
                        turn(100, (8.0, 0.0, 0.0), (2.0, 0.0, 0.0), False)]}
    summary = summarize_sessions([record], turns=3)
    assert summary["adaptation_over_generation_per_turn"] == pytest.approx((12.0 / 2) / 7.0)
    assert summary["adaptation_over_generation_per_turn_machine"] == pytest.approx((4.0 / 2) / 2.0)
    assert summary["machine_seconds_per_turn"] == pytest.approx(
        {"generation": 2.0, "words": 2.0, "sampling": 0.0, "update": 0.0})


def test_the_report_splits_a_weights_step_into_sampling_and_update(tmp_path):
    from rosa2_dspy.evaluation import ResultsFile
    from rosa2_dspy.report import build_report

    def turn(n, gen, weights):
        return {"turn": n, "boxed": False, "generated_tokens": 50, "words": None, "weights": weights,
                "seconds": {"generation": gen, "words": 0.0, "weights": 0.0},
                "compute_seconds": {"generation": gen, "words": 0.0,
                                    "weights": (weights or {}).get("compute_seconds", 0.0)}}

    record = {"unique_id": "p1", "solved": False, "turns_used": 3, "seconds": 30.0, "l2_shift": 0.1,
              "seconds_split": {"generation": 6.0, "words": 0.0, "weights": 20.0},
              "turns": [turn(1, 2.0, {"compute_seconds": 9.0, "seconds": 5.0}),  # 4 s sampling, 5 s update
                        turn(2, 2.0, {"compute_seconds": 4.0, "skipped": "no training rows"}),  # sampling only
                        turn(3, 2.0, None)]}
    (tmp_path / "ttt").mkdir()
    ResultsFile(tmp_path / "ttt" / "results.jsonl").append(record)
    report = build_report(tmp_path, ["ttt"], turns=3).read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())["methods"]["ttt"]
    assert summary["machine_seconds_per_turn"] == pytest.approx(
        {"generation": 2.0, "words": 0.0, "sampling": 4.0, "update": 2.5})
    assert "| ttt | 2.00 | 0.00 | 4.00 | 2.50 | 3.25 |" in report


def test_a_conversation_ends_without_waiting_for_a_generating_batch(tiny_engine):
    """Ending needs only pinned snapshots. It used to take the weights lock, which a generating batch holds:
    the 31 conversations of a finished batch then ended one whole (1024-token) batch at a time."""
    import threading

    session = Session(MathSolver(), tiny_engine, "ttt", OracleUser(), SessionConfig(turns=1, max_tokens=4))
    conv = session.begin(EXAMPLE)
    ended = threading.Event()
    with tiny_engine.weights_lock:  # a batch is generating
        threading.Thread(target=lambda: (session.end(conv), ended.set()), daemon=True).start()
        assert ended.wait(10), "end() waited for the weights lock"
    session.close()
    assert tiny_engine.pin_holds() == {}


def test_pe_then_ttt_at_two_turns_does_one_of_each_and_trains_on_the_answered_prompt(tiny_engine):
    class Recording(SpySession):
        def weights_step(self, conv, messages, rejected_replies, rejected, turn):
            self.calls.append("weights")
            self.trained = messages[-1]["content"]
            return {"scripted": True}

    sequential = Recording(MathSolver(), tiny_engine, "pe-then-ttt", ScriptedUser(), SessionConfig(turns=2))
    record = sequential.run(EXAMPLE)
    assert sequential.calls == ["answer", "words", "weights", "answer"]
    first, second = (t["statement"] for t in record["turns"])
    assert second == f"{first} (clarified 1)"
    assert record["turns"][0]["weights"]["trained_on"] == first and first in sequential.trained
    assert "(clarified" not in sequential.trained  # the update never saw the rewrite
    both = Recording(MathSolver(), tiny_engine, "rosa2", ScriptedUser(), SessionConfig(turns=2))
    record = both.run(EXAMPLE)
    assert both.calls == ["answer", "words", "weights", "answer"]
    assert record["turns"][0]["weights"]["trained_on"] == record["turns"][1]["statement"]  # conditioned on it
    assert record["turns"][1]["statement"] in both.trained


def test_the_weights_step_trains_on_exactly_the_statement_the_answer_module_saw(tiny_engine):
    """A clarifying program (MathSolver(clarify=True)) used to clarify again inside its answer, so the update
    trained on a statement the Answer module never saw. In a session the words step is the one rewrite."""
    from test_words import script_lm

    seen = []

    def reply(system, user):
        assert not system.startswith("Rewrite the math problem"), "the program clarified a second time"
        seen.append(user)
        return "[[ ## reasoning ## ]]\nadd\n\n[[ ## answer ## ]]\n\\boxed{7}"

    lm, _ = script_lm(reply)
    program = MathSolver(clarify=True)
    program.set_lm(lm)  # its predictors keep this scripted LM in the session (it is not on the engine)

    class Recording(Session):
        def words_step(self, conv, problem, history, feedback, revealed=None):
            return Refinement(clarified_problem="What is 2+3? Give an integer.", critique="")

        def weights_step(self, conv, messages, rejected_replies, rejected, turn):
            self.trained = messages[-1]["content"]
            return {}

    session = Recording(program, tiny_engine, "rosa2", ScriptedUser(), SessionConfig(turns=2, samples=0))
    record = session.run(EXAMPLE)
    answered = [t["statement"] for t in record["turns"]]
    assert answered == ["What is 2+3?", "What is 2+3? Give an integer."]
    assert [answered[i] in seen[i] for i in range(2)] == [True, True]  # each answer saw the turn's statement
    assert answered[1] in session.trained and record["turns"][0]["weights"]["trained_on"] == answered[1]


def test_threads_counts_conversations_in_flight_for_all_methods_together(tmp_path, tiny_engine, monkeypatch):
    """--threads N keeps N conversations in flight in all (it was N per method: 6 methods x 32 put a whole run in
    flight, and a run cut short had finished nothing); problem by problem, so records come out in order."""
    import threading
    import time

    from rosa2_dspy.experiments import compare_methods
    from rosa2_dspy.math.data import load_examples

    running, most, lock = [0], [0], threading.Lock()

    def run(self, example):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return {"unique_id": example.unique_id, "method": self.policy.name, "solved": False, "turns": [],
                "turns_used": 1, "l2_shift": 0.0, "error": None}

    monkeypatch.setattr(Session, "run", run)
    monkeypatch.setattr("rosa2_dspy.report.build_report", lambda *args, **kwargs: tmp_path)
    examples = load_examples("test", levels="1", limit=4)
    for threads, expected in ((1, 1), (3, 3)):
        compare_methods(MathSolver(), examples, ["single", "pe", "ttt"], tmp_path / f"t{threads}",
                        engine=tiny_engine, threads=threads, progress=False)
        assert most[0] == expected, (threads, most[0])
        most[0] = 0
    order = [json.loads(line)["unique_id"] for line in (tmp_path / "t1" / "single" / "results.jsonl").open()]
    assert order == [e.unique_id for e in examples]
