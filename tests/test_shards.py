"""Sharded MATH problems and the user who reveals them: splitting, withholding, revelation order, no gold leak,
sessions on a sharded user, the report split by semantic gap, and `rosa2 shards`."""

from __future__ import annotations

import json

import dspy
import pytest

from rosa2_dspy.math.data import load_examples
from rosa2_dspy.math.shards import _mask, shard, shard_example, split_problem, states_answer
from rosa2_dspy.math.users import REVEAL_WORDING, VAGUE_FEEDBACK, ShardedUser, make_user


@pytest.fixture(scope="module")
def test_problems():
    """MATH test, Levels 1-3, every problem, by unique_id."""
    return {e.unique_id: e for e in load_examples("test", levels="1,2,3", seed=None)}


def pieces_of(problem):
    return [(p.kind, p.text) for p in split_problem(problem)]


# real MATH problems, each with what the splitter must make of it
def test_sentences_split_outside_math_and_figures_stay_with_their_sentence(test_problems):
    pieces = split_problem(test_problems["test/geometry/577.json"].problem)
    assert [p.kind for p in pieces] == ["condition", "condition", "condition", "question"]
    assert pieces[0].text == "Each of $\\triangle PQR$ and $\\triangle STU$ has an area of $1.$"  # "$1.$" ends it
    assert pieces[3].text.startswith("What is the area of parallelogram $UVRW?$ [asy]")
    assert pieces[3].text.endswith("[/asy]")  # the figure is not a shard of its own


def test_a_leading_condition_clause_is_cut_also_when_its_comma_is_inside_the_math(test_problems):
    assert pieces_of(test_problems["test/precalculus/1186.json"].problem) == [
        ("condition", "If $\\frac{\\cos 3x}{\\cos x} = \\frac{1}{3}.$"),
        ("question", "Determine $\\frac{\\sin 3x}{\\sin x}.$")]
    assert pieces_of(test_problems["test/prealgebra/1121.json"].problem) == [
        ("condition", "If $3x+5=29$."), ("question", "What is the value of $x$?")]


def test_clauses_that_carry_nothing_are_not_cut(test_problems):
    # "In cents, what is ..." and "..., assuming each person mows at the same rate?" have no number
    assert pieces_of(test_problems["test/algebra/2743.json"].problem)[-1] == (
        "question", "In cents, what is the cost of a pencil?")
    assert pieces_of(test_problems["test/algebra/2565.json"].problem)[-1][0] == "question"
    assert len(split_problem(test_problems["test/algebra/2565.json"].problem)) == 2


def test_factorials_dollar_signs_and_answer_forms(test_problems):
    factorial = pieces_of(test_problems["test/prealgebra/1823.json"].problem)
    assert ("question", "What is the largest prime factor of $97!$ (97 factorial)?") in factorial
    assert pieces_of(test_problems["test/prealgebra/1349.json"].problem)[0] == (
        "condition", "Minh paid $\\$3$ for four doughnuts.")
    assert pieces_of(test_problems["test/intermediate_algebra/10.json"].problem) == [
        ("question", "Is $f(x) = 3^x$ an even function, odd function, or neither?"),
        ("form", 'Enter "odd", "even", or "neither".')]
    # with no question mark anywhere, the imperative sentence is the question
    assert pieces_of(test_problems["test/precalculus/356.json"].problem)[-1] == (
        "question", 'Enter the equation of this line in the form "$y = mx + b$".')
    assert pieces_of(test_problems["test/algebra/1265.json"].problem) == [
        ("question", "What power of 4 is equal to 8?"), ("form", "Express your answer as a common fraction.")]


def test_a_single_question_is_posed_whole_without_a_gap(test_problems):
    example = test_problems["test/number_theory/333.json"]
    sharded = shard_example(example)
    assert not sharded.semantic_gap and sharded.opening == example.problem and sharded.shards == []
    assert sharded.to_dict()["no_gap_reason"] == "the problem is a single question"


def test_a_shard_that_states_the_answer_is_never_withheld(test_problems):
    example = test_problems["test/prealgebra/1823.json"]  # "$97$ is the largest prime less than $100$." gold 97
    assert states_answer("$97$ is the largest prime less than $100$.", "97")
    assert not states_answer("Alice is 30 years old.", "18")
    assert states_answer("so the answer is 4", "7") and states_answer("it is $\\frac{1}{2}$.", "\\frac12")
    for seed in range(10):
        sharded = shard_example(example, seed)
        assert all("$97$ is the largest" not in s for s in sharded.shards)


def test_every_level_1_to_3_test_problem_shards_soundly(test_problems):
    gaps = 0
    for example in test_problems.values():
        sharded = shard_example(example, seed=0)
        kinds = [p.kind for p in sharded.pieces]
        assert kinds.count("question") == 1, example.unique_id
        # no math span is cut: every $...$ of the problem survives whole in some piece
        for span in _mask(example.problem)[1]:
            inner = span.strip("$").rstrip(",.")  # a clause cut may turn the math's last comma into a full stop
            assert any(inner in p.text for p in sharded.pieces), (example.unique_id, span)
        if not sharded.semantic_gap:
            assert sharded.opening == example.problem
            continue
        gaps += 1
        assert 1 <= len(sharded.withheld) <= 2
        for index, text in zip(sharded.withheld, sharded.shards):
            piece = sharded.pieces[index]
            assert piece.kind != "question" and piece.carries
            assert not states_answer(text, example.answer), example.unique_id
            assert piece.text not in sharded.opening  # withheld means not said at turn 1
        assert sharded.pieces[kinds.index("question")].text in sharded.opening
    assert 0.3 < gaps / len(test_problems) < 0.8  # 56% at seed 0 (BENCHMARKS.md)


def test_sharding_is_deterministic_and_the_seed_changes_the_choice(test_problems):
    examples = list(test_problems.values())[:300]
    first = [shard_example(e, 3).withheld for e in examples]
    assert first == [shard_example(e, 3).withheld for e in examples]
    assert first != [shard_example(e, 4).withheld for e in examples]
    assert shard("A. B.", unique_id="x").withheld == ()  # no number, no condition: nothing to withhold


# ----------------------------------------------------------------------------- the user


def wrong():
    return dspy.Prediction(answer="\\boxed{123456}")


def test_the_sharded_user_reveals_one_shard_per_failed_turn_then_complains(test_problems):
    example = test_problems["test/geometry/577.json"]
    user = make_user("sharded", seed=0)
    sharded = user.sharded(example)
    assert len(sharded.shards) == 2 and user.opening(example) == sharded.opening != example.problem
    verdicts = [user.judge(example, wrong(), turn) for turn in (1, 2, 3)]
    assert [v.revealed for v in verdicts] == [*sharded.shards, None]
    for verdict, shard_text in zip(verdicts, sharded.shards):
        assert any(verdict.feedback == w.format(shard=shard_text) for w in REVEAL_WORDING)
    assert verdicts[2].feedback in VAGUE_FEEDBACK and not verdicts[2].accepted
    accepted = user.judge(example, dspy.Prediction(answer=f"\\boxed{{{example.answer}}}"), 1)
    assert accepted.accepted and accepted.revealed is None
    # the same seed says the same words; the vague user is what it falls back to
    assert [user.judge(example, wrong(), t).feedback for t in (1, 2, 3)] == [v.feedback for v in verdicts]


def test_the_sharded_user_never_says_the_gold_answer(test_problems):
    user = ShardedUser(seed=1)
    for example in list(test_problems.values())[::5]:
        for turn in (1, 2, 3):
            feedback = user.judge(example, wrong(), turn).feedback
            assert not states_answer(feedback, example.answer), (example.unique_id, feedback)


# ----------------------------------------------------------------------------- sessions


def test_sessions_pose_the_opening_reveal_shards_and_record_the_gap(tiny_engine, test_problems):
    from math_solver import MathSolver
    from test_coadapt import SpySession

    from rosa2_dspy.coadapt import SessionConfig

    example = test_problems["test/geometry/577.json"]
    user = ShardedUser(seed=0)
    shards = user.sharded(example).shards
    seen = {}

    class Recording(SpySession):
        def words_step(self, conv, problem, history, feedback, revealed=None):
            seen.setdefault("words", []).append((problem, list(revealed)))
            return super().words_step(conv, problem, history, feedback, revealed)

    config = SessionConfig(turns=3)
    pe = Recording(MathSolver(), tiny_engine, "pe", user, config).run(example)
    assert pe["semantic_gap"] is True and pe["posed"]["withheld"] == shards
    assert pe["turns"][0]["statement"] == user.opening(example)
    assert [t.get("revealed") for t in pe["turns"]] == [shards[0], shards[1], None]
    assert seen["words"] == [(user.opening(example), shards[:1]), (user.opening(example), shards)]
    ttt = Recording(MathSolver(), tiny_engine, "ttt", user, config).run(example)
    assert all(s in ttt["turns"][2]["statement"] for s in shards)  # the conversation as it is: shards appended
    assert ttt["turns"][2]["statement"].startswith(user.opening(example))
    whole = Recording(MathSolver(), tiny_engine, "whole", user, config).run(example)
    assert whole["turns"][0]["statement"] == example.problem and whole["semantic_gap"] is True


@pytest.mark.parametrize("method,config", [("pe-then-ttt", {}), ("rosa2", {"words_after": "first"})])
def test_words_kept_from_an_earlier_turn_add_what_the_user_revealed_since(tiny_engine, test_problems, method, config):
    """A words method that skips its words step after a turn (pe-then-ttt's second half, words_after=first) answers
    the words it has plus what the user revealed at that turn, not the words alone."""
    from math_solver import MathSolver
    from test_coadapt import SpySession

    from rosa2_dspy.coadapt import SessionConfig

    example = test_problems["test/geometry/577.json"]
    user = ShardedUser(seed=0)
    shards = user.sharded(example).shards
    record = SpySession(MathSolver(), tiny_engine, method, user, SessionConfig(turns=3, **config)).run(example)
    assert [bool(t["words"]) for t in record["turns"]] == [True, False, False]
    rewritten = f"{user.opening(example)} (clarified 1)"
    assert record["turns"][1]["statement"] == rewritten
    assert record["turns"][2]["statement"] == f"{rewritten}\n\nThe user added: {shards[1].strip()}"


def test_append_words_kept_from_an_earlier_turn_stay_below_the_users_words_as_they_are_now(tiny_engine,
                                                                                          test_problems):
    """Append mode's promise holds on a turn without a words step: the prompt is what retry answers at that turn
    (the user's words, verbatim, every feedback so far) with the last clarification below it."""
    from math_solver import MathSolver
    from test_coadapt import SpySession

    from rosa2_dspy.coadapt import SessionConfig
    from rosa2_dspy.words import Refinement, as_told

    class Appending(SpySession):
        def words_step(self, conv, problem, history, feedback, revealed=None):
            self.calls.append("words")
            return Refinement(clarified_problem=f"{as_told(problem, history)}\n\nClarification: find the length.",
                              critique="unclear")

    example = test_problems["test/geometry/577.json"]
    user = ShardedUser(seed=0)
    config = SessionConfig(turns=3, clarify_mode="append", words_after="first")
    turns = Appending(MathSolver(), tiny_engine, "rosa2", user, config).run(example)["turns"]
    retry = SpySession(MathSolver(), tiny_engine, "retry", user, SessionConfig(turns=3)).run(example)["turns"]
    assert [bool(t["words"]) for t in turns] == [True, False, False]
    for ours, theirs in zip(turns[1:], retry[1:]):
        assert ours["statement"] == f"{theirs['statement']}\n\nClarification: find the length."


def test_refine_keeps_what_the_user_revealed_or_falls_back_to_it():
    from test_words import CLARIFIED, FEEDBACK, refine_reply, script_lm

    from rosa2_dspy.signatures import Clarify
    from rosa2_dspy.words import refine

    lm, _ = script_lm(refine_reply())  # CLARIFIED restates the problem's numbers, not the revealed 12 and 7
    dspy.configure(lm=lm)
    revealed = ["It takes 12 hours for 7 people."]
    result = refine(dspy.Predict(Clarify), "What is 1/3 + 1/6?", [], FEEDBACK, revealed=revealed)
    assert result.fallback and "what the user added" in result.fallback
    assert result.clarified_problem.startswith("What is 1/3 + 1/6?") and revealed[0] in result.clarified_problem
    kept = refine(dspy.Predict(Clarify), "What is 1/3 + 1/6?", [], FEEDBACK, revealed=["Use 1/6, not 1/3."])
    assert kept.fallback is None and kept.clarified_problem == CLARIFIED


# ----------------------------------------------------------------------------- report and CLI


def test_the_report_splits_by_gap_and_pairs_rosa2_with_each_method(tmp_path):
    from rosa2_dspy.evaluation import ResultsFile
    from rosa2_dspy.report import build_report

    def record(uid, solved, gap, fallback=False):
        turn = {"turn": 1, "boxed": True, "words": {"fallback": "x"} if fallback else None, "weights": None,
                "seconds": {"generation": 1.0, "words": 0.0, "weights": 0.0}}
        return {"unique_id": uid, "solved": solved, "turns_used": 1, "semantic_gap": gap, "l2_shift": 0.0,
                "turns": [turn], "seconds": 1.0, "seconds_split": {"generation": 1.0, "words": 0.0, "weights": 0.0}}

    outcomes = {"rosa2": [1, 1, 1, 1, 0, 1], "single": [0, 0, 1, 1, 0, 1]}  # problems 0-2 have a gap
    for method, solved in outcomes.items():
        (tmp_path / method).mkdir()
        results = ResultsFile(tmp_path / method / "results.jsonl")
        for i, s in enumerate(solved):
            results.append(record(f"p{i}", bool(s), i < 3, fallback=method == "rosa2" and i == 0))
    report = build_report(tmp_path, ["single", "rosa2"], turns=1).read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    pair = summary["paired"]["rosa2 - single"]
    assert (pair["problems"], pair["a_only"], pair["b_only"]) == (6, 2, 0)
    assert pair["difference"] == pytest.approx(2 / 6) and pair["ci95"][0] >= 0 and pair["mcnemar_p"] == 0.5
    gap = summary["by_semantic_gap"]
    assert gap["single"]["gap"]["solved"] == 1 and gap["single"]["no_gap"]["solved"] == 2
    assert gap["rosa2"]["gap"]["words_fallback_rate"] == 1.0
    assert "| rosa2 - single | 6 | +33.3%" in report and "| single | gap | 3 | 33.3%" in report


def test_rosa2_shards_counts_gaps_without_a_model(capsys):
    from rosa2_dspy.cli import main

    assert main(["shards", "--split", "test", "--level", "1", "--limit", "40", "--show", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["problems"] == 40 and 0 < out["semantic_gap"] < 40 and len(out["shown"]) == 2
    assert sum(g["problems"] for g in out["by_subject"].values()) == 40
    assert main(["shards", "--show", "-1"]) == 2
    assert "--show must be >= 0" in capsys.readouterr().err


def test_the_words_step_is_strict_unless_the_session_says_lenient(tiny_engine, test_problems, monkeypatch):
    from math_solver import MathSolver
    from test_coadapt import SpySession

    import rosa2_dspy.words as words
    from rosa2_dspy.coadapt import Session, SessionConfig

    class Words(SpySession):  # scripted answers, the real words step
        words_step = Session.words_step

    strict, real = [], words.refine
    monkeypatch.setattr(words, "refine", lambda *a, **k: strict.append(k["strict"]) or real(*a, **k))
    example = test_problems["test/geometry/577.json"]
    for check in ("strict", "lenient"):
        config = SessionConfig(turns=2, clarify_check=check)
        Words(MathSolver(), tiny_engine, "pe", ShardedUser(seed=0), config).run(example)
    assert strict == [True, False]
    assert SessionConfig().clarify_check == "strict"


def test_an_append_words_step_keeps_the_prompt_retry_answers_and_adds_below_it(tiny_engine, test_problems,
                                                                                 monkeypatch):
    """clarify_mode=append: each words turn's statement is retry's for the same turn, verbatim, with at most a
    clarification below it; and rosa2's update trains on that statement."""
    from math_solver import MathSolver
    from test_coadapt import SpySession

    import rosa2_dspy.words as words
    from rosa2_dspy.coadapt import Session, SessionConfig

    class Words(SpySession):  # scripted answers, the real words step on the tiny model
        words_step = Session.words_step

    modes, real = [], words.refine
    monkeypatch.setattr(words, "refine", lambda *a, **k: modes.append(k["mode"]) or real(*a, **k))
    example = test_problems["test/geometry/577.json"]
    config = SessionConfig(turns=3, clarify_mode="append")
    retry = Words(MathSolver(), tiny_engine, "retry", ShardedUser(seed=0), config).run(example)
    for method in ("pe", "rosa2"):
        session = Words(MathSolver(), tiny_engine, method, ShardedUser(seed=0), config)
        record = session.run(example)
        turns = record["turns"]
        for before, ours, theirs in zip(turns[:-1], turns[1:], retry["turns"][1:], strict=True):
            assert ours["statement"] == theirs["statement"] or ours["statement"].startswith(
                theirs["statement"] + "\n\nClarification: "), (ours["statement"], theirs["statement"])
            # the words step that made this turn's statement is recorded on the turn before
            assert (before["words"]["fallback"] is None) == (ours["statement"] != theirs["statement"])
            if method == "rosa2":
                assert before["weights"]["trained_on"] == ours["statement"]
    assert modes == ["append"] * 4 and SessionConfig().clarify_mode == "replace"
    assert all(shard in retry["turns"][2]["statement"] for shard in ShardedUser(seed=0).sharded(example).shards)
