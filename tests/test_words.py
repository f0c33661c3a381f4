"""Words: MATH feedback, textual-gradient compile with scripted student and critic LMs, refinement, recipes."""

from __future__ import annotations

import tomllib
from pathlib import Path

import dspy
import pytest
from dspy.lm15 import Message, Response, TextPart, Usage
from dspy.teleprompt.bootstrap_trace import FailedPrediction

from math_solver import MathSolver
from rosa2_dspy.engine import request_messages
from rosa2_dspy.signatures import Answer, Clarify
from rosa2_dspy.math.feedback import math_feedback, math_feedback_metric, math_score
from rosa2_dspy.words import (Refinement, Rollout, TextualGradientOptimizer, apply_gradient, plain_text_gepa_proposer,
                              refine, textual_gradient, validate_instruction)
from rosa2_dspy.words.refinement import APPEND_REMINDER, RESTATE_REMINDER, as_told, solution_reason

ROOT = Path(__file__).resolve().parents[1]
ANSWER_WORDS = Answer.instructions
CLARIFY_WORDS = Clarify.instructions
MARKER = "Check every arithmetic step twice."  # the scripted student is right when its words say this
SABOTAGE = "Answer from memory without working."  # ... and always wrong when they say this

PROBLEMS = {
    "What is 2+3?": "5", "What is 10-4?": "6", "What is 3*3?": "9", "What is 12/4?": "3",
    "What is 1/2 + 1/4?": "\\frac{3}{4}", "What is 7+8?": "15", "What is 20-13?": "7", "What is 6*7?": "42",
}
EASY = {"What is 2+3?", "What is 7+8?"}  # right even with the original words
TRAIN = [dspy.Example(problem=p, answer=PROBLEMS[p]).with_inputs("problem")
         for p in ("What is 2+3?", "What is 10-4?", "What is 3*3?", "What is 12/4?")]
VAL = [dspy.Example(problem=p, answer=PROBLEMS[p]).with_inputs("problem")
       for p in ("What is 1/2 + 1/4?", "What is 7+8?", "What is 20-13?", "What is 6*7?")]


class ScriptEngine:
    """A DSPy engine whose replies come from ``reply(system, user)``; it keeps every request."""

    def __init__(self, reply):
        self.reply = reply
        self.calls: list[tuple[str, str]] = []
        self.max_tokens: list[int | None] = []

    def complete(self, request):
        self.max_tokens.append(request.config.max_tokens)
        messages = request_messages(request)
        system = next((m["content"] for m in messages if m["role"] == "system"), "")
        user = messages[-1]["content"]
        self.calls.append((system, user))
        text = self.reply(system, user)
        return Response(id=None, model=request.model, message=Message.assistant([TextPart(text)]),
                        finish_reason="stop", usage=Usage(input_tokens=1, output_tokens=1, total_tokens=2))

    def stream(self, request):
        raise NotImplementedError

    def close(self):
        pass


def script_lm(reply) -> tuple[dspy.LM, ScriptEngine]:
    engine = ScriptEngine(reply)
    return dspy.LM("local/script", engine=engine, cache=False, num_retries=0), engine


def student_reply(system: str, user: str) -> str:
    """Clarify echoes the problem; Answer is right on EASY problems, or on all when the words hold MARKER."""
    problem = user.split("\n\n")[0].strip()
    if system.startswith("Rewrite the math problem") or system.startswith("Restate"):
        return problem
    gold = PROBLEMS.get(problem)
    if SABOTAGE in system or gold is None:
        return "I am not sure."
    if MARKER in system or problem in EASY:
        return f"Working it out carefully. \\boxed{{{gold}}}"
    return "It is \\boxed{0}" if len(problem) % 2 else "Maybe zero."


def critic(mode: str = "improve"):
    """A scripted critic: a fixed critique, and a rewrite chosen by ``mode``."""

    def reply(system: str, user: str) -> str:
        if system.startswith("You review the instruction"):
            if mode == "empty":
                return ""
            return "The instruction never asks the solver to verify its arithmetic."
        if not system.startswith("Rewrite the instruction"):
            raise AssertionError(f"unexpected critic prompt: {system[:60]}")
        if "Rewrite the math problem" in user:  # the Clarify predictor's words
            return "Restate the math problem clearly, keeping every number, condition and the question asked."
        return {
            "improve": f"{ANSWER_WORDS} {MARKER}",
            "regress": f"{ANSWER_WORDS} {SABOTAGE}",
            "empty": "",
            "garbled": "$$ {{}} ## 0.1 0.2 ## ++ -- ** // \\\\ ~~ ^^ $$ [] () <> ==",
            "repeated": "boxed boxed boxed boxed boxed boxed boxed boxed",
            "long": ANSWER_WORDS + " Be very careful." * 200,
            "drop_format": "Solve the math problem step by step and state the final answer clearly at the end.",
        }[mode]

    return reply


def raising_reply(system: str, user: str) -> str:
    raise RuntimeError("critic backend is down")


def compile_with(mode: str, *, clarify: bool = True, rounds: int = 1, **kwargs):
    student_lm, student_engine = script_lm(student_reply)
    critic_lm, critic_engine = script_lm(critic(mode) if mode != "raise" else raising_reply)
    dspy.configure(lm=student_lm)
    optimizer = TextualGradientOptimizer(math_feedback_metric,
                                         critic_lm=critic_lm, rounds=rounds, minibatch_size=4, val_size=4,
                                         num_threads=1, **kwargs)
    student = MathSolver(clarify=clarify)
    compiled = optimizer.compile(student, trainset=TRAIN, valset=VAL)
    return student, compiled, optimizer, critic_engine


def instruction(program: dspy.Module, name: str) -> str:
    return dict(program.named_predictors())[name].signature.instructions


def entry(history: list[dict], predictor: str) -> dict:
    return next(e for e in history if e["predictor"] == predictor)


# ----------------------------------------------------------------------------- feedback


FAILURES = {
    "no prediction": lambda gold: None,
    "parse failure": lambda gold: FailedPrediction(completion_text="I think so."),
    "no answer field": lambda gold: dspy.Prediction(reasoning="long reasoning"),
    "unboxed wrong": lambda gold: dspy.Prediction(answer="seventeen"),
    "empty box": lambda gold: dspy.Prediction(answer="\\boxed{}"),
    "words in box": lambda gold: dspy.Prediction(answer="\\boxed{the answer is my guess}"),
    "unclosed box": lambda gold: dspy.Prediction(answer="\\boxed{\\frac{1}{"),
    "decimal": lambda gold: dspy.Prediction(answer="\\boxed{0.3}"),
    "unsimplified fraction": lambda gold: dspy.Prediction(answer="\\boxed{\\frac{4}{6}}"),
    "unsimplified radical": lambda gold: dspy.Prediction(answer="\\boxed{\\sqrt{8}}"),
    "wrong value": lambda gold: dspy.Prediction(answer="\\boxed{17}"),
}


@pytest.mark.parametrize("gold", ["5", "\\frac{1}{2}", "2\\sqrt{3}", "\\frac{3}{4}"])
@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_feedback_never_contains_the_gold_answer(failure, gold):
    result = math_feedback_metric(dspy.Example(answer=gold), FAILURES[failure](gold))
    assert float(result) == 0.0
    assert result.feedback.strip()
    assert gold not in result.feedback
    for name in ("clarify", "answer.predict"):  # GEPA's per-predictor calls too
        assert gold not in math_feedback_metric(dspy.Example(answer=gold), FAILURES[failure](gold),
                                                None, name, None).feedback


@pytest.mark.parametrize("answer,gold,phrase", [
    (None, "5", "No \\boxed{} answer"),
    ("seventeen", "5", "never wrote its final answer inside \\boxed"),
    ("\\boxed{the answer is five}", "5", "does not parse"),
    ("\\boxed{2+}", "5", "ends with an operator"),
    ("\\boxed{\\frac{1}{2}", "5", "not closed"),
    ("\\boxed{}", "5", "is empty"),
    ("\\boxed{0.3}", "\\frac{1}{2}", "decimal approximation but this problem expects an exact answer (a fraction)"),
    ("\\boxed{3.46}", "2\\sqrt{3}", "exact answer (a radical)"),
    ("\\boxed{\\frac{4}{6}}", "\\frac{1}{2}", "not in lowest terms"),
    ("\\boxed{\\sqrt{12}}", "4\\sqrt{3}", "radical is not simplified"),
    ("\\boxed{7}", "5", "Wrong value"),
])
def test_each_failure_type_names_its_failure(answer, gold, phrase):
    score, feedback = math_feedback(dspy.Example(answer=gold), dspy.Prediction(answer=answer))
    assert score == 0.0
    assert phrase in feedback


def test_correct_answers_score_one_with_positive_feedback():
    result = math_feedback_metric(dspy.Example(answer="\\frac{1}{2}"), dspy.Prediction(answer="\\boxed{\\frac12}"))
    assert float(result) == 1.0 and result.feedback.startswith("Correct")
    assert math_score(dspy.Example(answer="5"), dspy.Prediction(answer="\\boxed{5}")) == 1.0
    assert math_score(dspy.Example(answer="5"), dspy.Prediction(answer="\\boxed{6}")) == 0.0
    # a right value in a looser form still counts, with a note on the form
    score, feedback = math_feedback(dspy.Example(answer="\\frac{1}{2}"), dspy.Prediction(answer="\\boxed{0.5}"))
    assert score == 1.0 and "decimal" in feedback
    clarify = math_feedback_metric(dspy.Example(answer="5"), dspy.Prediction(answer="\\boxed{6}"), None, "clarify")
    assert clarify.feedback.startswith("The solver's final answer after this rewritten problem")


# ----------------------------------------------------------------------------- validation of rewrites


@pytest.mark.parametrize("new,reason", [
    ("", "empty"),
    ("   \n ", "empty"),
    ("$$ {{}} ## 0.1 ## ++ -- ** // \\boxed{} ==", "garbled"),
    ("boxed boxed boxed boxed boxed boxed boxed boxed", "garbled"),
    ("Solve it. Solve it. Solve it. Solve it.", "garbled"),
    ("Solve.", "garbled"),
    (ANSWER_WORDS + " Be careful." * 200, "over-long"),
    ("Solve the math problem step by step and state the final answer clearly.", "format-dropping"),
    (ANSWER_WORDS, "unchanged"),
])
def test_bad_rewrites_are_rejected_with_a_reason(new, reason):
    got = validate_instruction(ANSWER_WORDS, new, max_chars=1200)
    assert got is not None and got.startswith(reason), got


def test_good_rewrites_pass_validation():
    assert validate_instruction(ANSWER_WORDS, f"{ANSWER_WORDS} {MARKER}", 1200) is None
    # format markers are only required when the old words had them
    assert validate_instruction(CLARIFY_WORDS, "Restate the problem clearly, keeping all numbers.", 1200) is None


# ----------------------------------------------------------------------------- the gradient and the update


def test_textual_gradient_sends_the_failures_and_apply_gradient_returns_the_rewrite():
    critic_lm, engine = script_lm(critic("improve"))
    records = [{"inputs": {"problem": "What is 10-4?"}, "output": "Maybe zero.", "score": 0.0,
                "feedback": "No \\boxed{} answer: the reply could not be parsed into a final answer."}]
    critique = textual_gradient(ANSWER_WORDS, records, critic_lm)
    assert critique == "The instruction never asks the solver to verify its arithmetic."
    system, user = engine.calls[0]
    assert ANSWER_WORDS in user and "What is 10-4?" in user and "Maybe zero." in user
    assert "could not be parsed" in user
    assert apply_gradient(ANSWER_WORDS, critique, critic_lm, 1200) == f"{ANSWER_WORDS} {MARKER}"
    assert critique in engine.calls[1][1] and "\\boxed" in engine.calls[1][1]  # the requirements are stated


def test_a_small_models_raw_reply_is_usable():
    replies = iter(["[[ ## critique ## ]]\nAsk for a check.\n[[ ## completed ## ]]",
                    'New instruction: "Solve it and box the answer as \\boxed{...}."'])
    critic_lm, _ = script_lm(lambda system, user: next(replies))
    assert textual_gradient("old", [{"inputs": {}, "output": "", "score": 0, "feedback": "x"}], critic_lm) \
        == "Ask for a check."
    assert apply_gradient("old \\boxed{}", "c", critic_lm) == "Solve it and box the answer as \\boxed{...}."


# ----------------------------------------------------------------------------- the optimizer


def test_optimizer_accepts_an_improving_rewrite():
    student, compiled, optimizer, critic_engine = compile_with("improve")
    answer = entry(compiled.words_history, "answer.predict")
    assert answer["accepted"] and answer["reason"] is None
    assert answer["score_candidate"] == 1.0 and answer["score_current"] == 0.25  # one of four easy
    assert answer["critique"] == "The instruction never asks the solver to verify its arithmetic."
    assert instruction(compiled, "answer.predict") == f"{ANSWER_WORDS} {MARKER}" == answer["instruction_after"]
    assert instruction(student, "answer.predict") == ANSWER_WORDS  # the student is left alone
    # the clarify rewrite is valid but no better: rejected on score, words kept
    clarify = entry(compiled.words_history, "clarify")
    assert not clarify["accepted"] and clarify["reason"].startswith("not better")
    assert instruction(compiled, "clarify") == CLARIFY_WORDS == clarify["instruction_after"]
    # the critic saw the failures' feedback, never a gold answer
    critique_prompts = [user for system, user in critic_engine.calls if system.startswith("You review")]
    assert any("No \\boxed{} answer" in user for user in critique_prompts)
    assert optimizer.history == compiled.words_history
    with dspy.context(lm=script_lm(student_reply)[0]):
        assert compiled(problem="What is 6*7?").answer == "\\boxed{42}"


def test_optimizer_rejects_a_regressing_rewrite():
    _, compiled, _, _ = compile_with("regress", clarify=False)
    answer = entry(compiled.words_history, "answer.predict")
    assert not answer["accepted"]
    assert answer["score_current"] == 0.25 and answer["score_candidate"] == 0.0
    assert answer["reason"].startswith("not better on validation")
    assert answer["candidate"] == f"{ANSWER_WORDS} {SABOTAGE}"
    assert instruction(compiled, "answer.predict") == ANSWER_WORDS


def test_a_predictor_the_program_never_calls_is_skipped_with_a_note():
    _, compiled, _, critic_engine = compile_with("improve", clarify=False)
    clarify = entry(compiled.words_history, "clarify")
    assert clarify["records"] == 0 and "not called" in clarify["note"]
    assert all("Rewrite the math problem" not in user for _, user in critic_engine.calls)
    assert instruction(compiled, "answer.predict").endswith(MARKER)


@pytest.mark.parametrize("mode,reason", [
    ("empty", "empty rewrite"),
    ("garbled", "garbled"),
    ("repeated", "garbled"),
    ("long", "over-long"),
    ("drop_format", "format-dropping"),
])
def test_bad_critic_rewrites_are_rejected_and_the_run_goes_on(mode, reason, caplog):
    with caplog.at_level("INFO", logger="rosa2_dspy.words"):
        _, compiled, _, _ = compile_with(mode, clarify=False, rounds=2)
    answers = [e for e in compiled.words_history if e["predictor"] == "answer.predict"]
    assert [e["round"] for e in answers] == [0, 1]
    assert all(e["reason"].startswith(reason) and not e["accepted"] and e["score_candidate"] is None
               for e in answers)
    assert instruction(compiled, "answer.predict") == ANSWER_WORDS
    assert f"rewrite rejected ({reason}" in caplog.text
    if mode == "empty":  # an empty critique falls back to the metric's own feedback
        assert answers[0]["critique"].startswith("The outputs failed in these ways")


def test_a_critic_that_raises_keeps_the_rounds_results_and_returns_a_program():
    _, compiled, optimizer, _ = compile_with("raise", rounds=2)
    answers = [e for e in compiled.words_history if e["predictor"] == "answer.predict"]
    assert len(answers) == 2
    assert all("critic backend is down" in e["error"] and not e["accepted"] for e in answers)
    assert all(e["score_current"] == 0.25 and e["records"] == 4 for e in answers)
    assert instruction(compiled, "answer.predict") == ANSWER_WORDS
    assert len(optimizer.history) == 4  # two rounds x two predictors, all recorded


def test_held_out_validation_when_no_valset_and_bad_settings():
    student_lm, _ = script_lm(student_reply)
    critic_lm, _ = script_lm(critic("improve"))
    dspy.configure(lm=student_lm)
    optimizer = TextualGradientOptimizer(math_feedback_metric,
                                         critic_lm=critic_lm, rounds=1, minibatch_size=2, val_size=3, num_threads=1)
    train, val = optimizer._split(TRAIN + VAL, None)
    assert len(val) == 3 and len(train) == 5 and not {id(x) for x in val} & {id(x) for x in train}
    optimizer.seed = 5  # a compile of several rounds changes the seed: the held-out problems stay the same
    assert [id(x) for x in optimizer._split(TRAIN + VAL, None)[1]] == [id(x) for x in val]
    compiled = optimizer.compile(MathSolver(), trainset=TRAIN + VAL)
    assert compiled.words_history and compiled._compiled
    with pytest.raises(ValueError, match="rounds"):
        TextualGradientOptimizer(math_feedback_metric, rounds=0)
    with pytest.raises(ValueError, match="non-empty trainset"):
        optimizer.compile(MathSolver(), trainset=[])


def test_a_compiled_program_saves_and_reloads_with_its_instructions(tmp_path):
    _, compiled, _, _ = compile_with("improve")
    path = tmp_path / "words.json"
    compiled.save(str(path))
    fresh = MathSolver(clarify=True)
    assert instruction(fresh, "answer.predict") == ANSWER_WORDS
    fresh.load(str(path))
    for name, predictor in compiled.named_predictors():
        assert instruction(fresh, name) == predictor.signature.instructions
    assert instruction(fresh, "answer.predict").endswith(MARKER)


def test_better_together_runs_with_the_words_optimizer_as_p():
    student_lm, _ = script_lm(student_reply)
    critic_lm, _ = script_lm(critic("improve"))
    student = MathSolver()
    student.set_lm(student_lm)
    words = TextualGradientOptimizer(math_feedback_metric,
                                     critic_lm=critic_lm, rounds=1, minibatch_size=4, val_size=4, num_threads=1)
    optimizer = dspy.BetterTogether(metric=math_feedback_metric, p=words)
    result = optimizer.compile(student, trainset=TRAIN, valset=VAL, strategy="p", num_threads=1, seed=0)
    assert result.flag_compilation_error_occurred is False
    scores = {c["strategy"]: c["score"] for c in result.candidate_programs}
    assert scores[""] == 25.0 and scores["p"] == 100.0
    assert instruction(result, "answer.predict").endswith(MARKER)
    assert words.history and entry(words.history, "answer.predict")["accepted"]


def test_a_tiny_local_model_as_student_and_default_critic_never_breaks_the_program(tiny_engine):
    """The critic defaults to DSPy's LM (the local engine); a random model's raw text is handled and rejected."""
    dspy.configure(lm=tiny_engine.lm(cache=False, max_tokens=24))
    optimizer = TextualGradientOptimizer(math_feedback_metric, rounds=1, minibatch_size=2, val_size=2, num_threads=2)
    compiled = optimizer.compile(MathSolver(), trainset=TRAIN, valset=VAL)
    answer = entry(compiled.words_history, "answer.predict")
    assert answer["records"] == 2 and answer["critique"]
    assert answer["error"] is None and not answer["accepted"] and answer["reason"]
    assert instruction(compiled, "answer.predict") == ANSWER_WORDS
    # the engine served the two validation runs, the two minibatch runs and the two critic calls
    assert tiny_engine.stats["requests"] >= 6


def test_gepa_runs_on_the_same_metric_with_a_plain_text_reflection_lm():
    student_lm, _ = script_lm(student_reply)
    reflection_lm, reflection_engine = script_lm(lambda system, user: f"{ANSWER_WORDS} {MARKER}")
    dspy.configure(lm=student_lm)
    gepa = dspy.GEPA(metric=math_feedback_metric, reflection_lm=reflection_lm, max_metric_calls=30,
                     reflection_minibatch_size=3, num_threads=1, instruction_proposer=plain_text_gepa_proposer())
    compiled = gepa.compile(MathSolver(), trainset=TRAIN, valset=VAL)
    assert instruction(compiled, "answer.predict") == f"{ANSWER_WORDS} {MARKER}"
    # GEPA's reflection read our feedback texts
    assert any("Wrong value" in user or "No \\boxed{} answer" in user for _, user in reflection_engine.calls)


# ----------------------------------------------------------------------------- test-time refinement


FEEDBACK = "hmm, that's not what I asked"
PROBLEM = "What is 1/3 + 1/6?"
CLARIFIED = "What is 1/3 + 1/6? Give the result as a fraction in lowest terms."
TURN_CRITIQUE = "The user wanted an exact fraction, not a decimal."


def refine_reply(clarified: str = CLARIFIED, critique: str | None = TURN_CRITIQUE):
    def reply(system: str, user: str) -> str:
        if system.startswith("A user was not satisfied"):
            if critique is None:
                raise RuntimeError("no critic today")
            return critique
        assert system == CLARIFY_WORDS
        return clarified

    return reply


@pytest.mark.parametrize("as_program", [False, True])
def test_refine_puts_the_feedback_into_the_clarify_prompt(as_program):
    lm, engine = script_lm(refine_reply())
    dspy.configure(lm=lm)
    clarify = MathSolver(clarify=True) if as_program else dspy.Predict(Clarify)
    history = [{"answer": "\\boxed{0.5}", "feedback": "wrong"}]
    result = refine(clarify, PROBLEM, history, FEEDBACK)
    assert isinstance(result, Refinement)
    assert result.clarified_problem == CLARIFIED and result.critique == TURN_CRITIQUE and result.fallback is None
    system, user = engine.calls[-1]
    assert system == CLARIFY_WORDS
    assert FEEDBACK in user and TURN_CRITIQUE in user and PROBLEM in user and "\\boxed{0.5}" in user
    assert FEEDBACK in engine.calls[0][1]  # the critic read the feedback too


def test_refine_caps_both_of_its_calls_at_max_tokens():
    lm, engine = script_lm(refine_reply())
    dspy.configure(lm=lm)
    result = refine(dspy.Predict(Clarify), PROBLEM, [], FEEDBACK, max_tokens=64)
    assert result.clarified_problem == CLARIFIED
    assert engine.max_tokens == [64, 64]  # the critique and the clarified problem


@pytest.mark.parametrize("reply", ["", "#### $$$$ %%%% ^^^^", "Sure, here you go: the rewritten problem."])
def test_refine_falls_back_to_the_problem_with_the_feedback_as_a_note(reply):
    lm, _ = script_lm(refine_reply(clarified=reply))
    dspy.configure(lm=lm)
    result = refine(dspy.Predict(Clarify), PROBLEM, [], FEEDBACK)
    assert result.clarified_problem.startswith(PROBLEM) and FEEDBACK in result.clarified_problem
    assert result.fallback and result.critique == TURN_CRITIQUE


SOLVED = "To add them we need a common denominator:\n\\[ \\frac{1}{3} + \\frac{1}{6} = \\frac{1}{2} \\]"


@pytest.mark.parametrize("reply, why", [
    (SOLVED, "it solves the problem (displayed working)"),
    ("What is the sum of 1/3 and 1/6?\n\n**Step 1:** write the first fraction, 1/3, over the same denominator.",
     "it solves the problem (solution steps)"),
    ("What is 1/3 + 1/6? First we write 1/3 as 2/6.", "it solves the problem (a solver's voice)"),
    ("The sum of 1/3 and 1/6 is 1/2.", "it asks nothing"),
    ("What is 1/3 + 1/6? The fractions come from a recipe my grandmother wrote down many years ago, when she still "
     "lived by the sea and baked bread for the whole village every morning before sunrise, and she always insisted "
     "that each measurement be exact, since a loaf made with careless amounts would never rise in her old oven.",
     "characters for a statement"),
    ("What is 1/3 plus one sixth?", "it drops the number(s) 6"),
])
def test_strict_refine_refuses_a_rewrite_that_solves_or_drops_a_number(reply, why):
    """The first design kept any rewrite with one of the problem's numbers: the 1.5B default solved the problem
    instead of restating it in most of its rewrites. Strict: asked for the statement only, checked, else the
    problem and the feedback as a note."""
    lm, engine = script_lm(refine_reply(clarified=reply))
    dspy.configure(lm=lm)
    strict = refine(dspy.Predict(Clarify), PROBLEM, [], FEEDBACK, strict=True)
    assert RESTATE_REMINDER in engine.calls[-1][1]  # the last words of the Clarify call's user message
    assert strict.fallback and why in strict.fallback, strict.fallback
    assert strict.clarified_problem.startswith(PROBLEM) and FEEDBACK in strict.clarified_problem
    lenient = refine(dspy.Predict(Clarify), PROBLEM, [], FEEDBACK)
    assert RESTATE_REMINDER not in engine.calls[-1][1]
    assert lenient.fallback is None and lenient.clarified_problem == reply


def test_strict_refine_keeps_a_restatement_and_every_math_problem_passes_as_its_own():
    lm, _ = script_lm(refine_reply())
    dspy.configure(lm=lm)
    kept = refine(dspy.Predict(Clarify), PROBLEM, [], FEEDBACK, strict=True)
    assert kept.fallback is None and kept.clarified_problem == CLARIFIED
    # a problem with displayed math, asked in the imperative, restated whole: no solution marks beyond its own
    problem = "Find $x$ such that \\[x^2 = 2x + 2y - 3.\\]"
    assert solution_reason(problem + " Let $y = 2$.", [problem, "Let $y = 2$."]) is None
    from rosa2_dspy.math.data import load_examples
    from rosa2_dspy.math.shards import shard

    for example in load_examples("train", limit=2000, seed=0):  # the whole problem restates its sharded pieces
        sharded = shard(example.problem, gold=example.answer, unique_id=example.unique_id)
        pieces = [sharded.opening, *(sharded.pieces[i].text for i in sharded.withheld)]
        assert solution_reason(example.problem, pieces) is None, example.problem


APPEND_HISTORY = [{"answer": "\\boxed{0.5}", "feedback": FEEDBACK}]
TOLD = f"{PROBLEM}\n\nFeedback on the earlier answer(s): {FEEDBACK}"


@pytest.mark.parametrize("note", ["Give the result as a fraction in lowest terms.",
                                  "Your answer .50 in turn 1 was a decimal; the user wants the sum as an exact "
                                  "fraction, like \\frac{1}{3} is."])
def test_append_keeps_the_users_words_verbatim_and_adds_the_clarification_below(note):
    """Append mode: the user's words (what retry answers) stay as they are, the clarification goes below them;
    it may repeat a number of the problem or of an earlier answer."""
    lm, engine = script_lm(refine_reply(clarified=note))
    dspy.configure(lm=lm)
    assert as_told(PROBLEM, APPEND_HISTORY) == TOLD and as_told(PROBLEM, []) == PROBLEM
    result = refine(dspy.Predict(Clarify), PROBLEM, APPEND_HISTORY, FEEDBACK, strict=True, mode="append")
    assert result.fallback is None and result.critique == TURN_CRITIQUE
    assert result.clarified_problem == f"{TOLD}\n\nClarification: {note}"
    lm, _ = script_lm(refine_reply(clarified=f"**Clarification:** {note}"))  # a label of its own: said once
    dspy.configure(lm=lm)
    labelled = refine(dspy.Predict(Clarify), PROBLEM, APPEND_HISTORY, FEEDBACK, strict=True, mode="append")
    assert labelled.clarified_problem == result.clarified_problem
    system, user = engine.calls[-1]
    assert system == CLARIFY_WORDS and TOLD in user and TURN_CRITIQUE in user
    assert user.rstrip().endswith(APPEND_REMINDER) and RESTATE_REMINDER not in user


@pytest.mark.parametrize("note, why", [
    (SOLVED, "it solves the problem (displayed working)"),
    ("First we write 1/3 as 2/6, then add.", "it solves the problem (a solver's voice)"),
    ("The user wants the sum, which is 1/2.", "it gives the number(s) 2, which the user did not"),
    ("The user wants the sum; it is .25 more than 1/3.", "it gives the number(s) 0.25, which the user did not"),
    ("The user asks for the exact sum of the two fractions written as one fraction in lowest terms, not a decimal "
     "approximation and not a mixed number. The earlier reply gave a decimal, which the user did not want. Both "
     "fractions have to be brought to a common denominator first; the result must then be reduced fully, and the "
     "final form should be a single fraction such as the user would write on paper, with a numerator and a "
     "denominator that share no common factor, since anything else would not be what the user asked.",
     "no short clarification"),
    ("", "the clarify call failed"),
    ("#### $$$$ %%%% ^^^^", "garbled"),
])
def test_append_refuses_a_clarification_that_solves_and_leaves_the_users_words_alone(note, why):
    lm, _ = script_lm(refine_reply(clarified=note))
    dspy.configure(lm=lm)
    result = refine(dspy.Predict(Clarify), PROBLEM, APPEND_HISTORY, FEEDBACK, strict=True, mode="append")
    assert result.fallback and why in result.fallback, result.fallback
    assert result.clarified_problem == TOLD  # exactly retry's prompt: the words step added nothing
    if note.startswith("The user"):  # lenient: only a garbled clarification is refused
        lenient = refine(dspy.Predict(Clarify), PROBLEM, APPEND_HISTORY, FEEDBACK, mode="append")
        assert lenient.fallback is None and lenient.clarified_problem.endswith(note)
    with pytest.raises(ValueError, match="mode must be"):
        refine(dspy.Predict(Clarify), PROBLEM, APPEND_HISTORY, FEEDBACK, mode="rewrite")


def test_refine_without_a_working_critic_still_clarifies():
    lm, engine = script_lm(refine_reply(critique=None))
    critic_lm, critic_engine = script_lm(raising_reply)
    dspy.configure(lm=lm)
    result = refine(dspy.Predict(Clarify), PROBLEM, ["\\boxed{0.5}"], FEEDBACK, critic_lm=critic_lm)
    assert result.clarified_problem == CLARIFIED
    assert FEEDBACK in result.critique  # the deterministic critique quotes the feedback
    assert critic_engine.calls and all(not s.startswith("A user") for s, _ in engine.calls)


# ----------------------------------------------------------------------------- recipes


def _table(name: str) -> tuple[dict, dict]:
    data = tomllib.loads((ROOT / "optimizers" / name).read_text())
    optimizer = dict(data["optimizer"])
    optimizer.pop("kind")
    return optimizer, data["critic"]


def test_the_recipe_files_build_their_optimizers():
    words, words_critic = _table("words.toml")
    optimizer = TextualGradientOptimizer(metric=math_feedback_metric, critic_lm=None, **words)
    assert (optimizer.rounds, optimizer.minibatch_size, optimizer.val_size, optimizer.max_instruction_chars) \
        == (2, 4, 16, 1200)
    assert words_critic == {"model": "engine"}
    gepa, gepa_critic = _table("gepa.toml")
    assert gepa == {"max_metric_calls": 60, "reflection_minibatch_size": 3} and gepa_critic == {"model": "engine"}
    critic_lm, _ = script_lm(critic())
    built = dspy.GEPA(metric=math_feedback_metric, reflection_lm=critic_lm, **gepa)
    assert built.max_metric_calls == 60 and built.reflection_minibatch_size == 3
    for name in ("words.toml", "gepa.toml"):
        assert "rosa2 compile --program programs/math_solver.py --optimizer optimizers/words.toml" \
            in (ROOT / "optimizers" / name).read_text()


def test_format_credit_breaks_ties_in_favour_of_boxed_answers():
    boxed = [Rollout(None, dspy.Prediction(answer="\\boxed{3}"), [], 0.0, "")]
    bare = [Rollout(None, dspy.Prediction(answer="3"), [], 0.0, "")]
    with_credit = TextualGradientOptimizer(math_feedback_metric, format_credit=0.1)
    plain = TextualGradientOptimizer(math_feedback_metric)
    with_credit.rollouts = lambda program, examples: boxed
    plain.rollouts = lambda program, examples: boxed
    assert with_credit.score(None, [1]) == pytest.approx(0.1) and plain.score(None, [1]) == 0.0
    with_credit.rollouts = lambda program, examples: bare
    assert with_credit.score(None, [1]) == 0.0
    with pytest.raises(ValueError, match="format_credit"):
        TextualGradientOptimizer(math_feedback_metric, format_credit=1.5)
