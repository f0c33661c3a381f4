import time

import pytest

from rosa2_dspy.math.grading import grade, last_boxed, strict_equal

# (gold, prediction, correct, strict, boxed)
CASES = [
    ("\\frac{1}{2}", "so the answer is \\boxed{\\dfrac{1}{2}}", True, True, True),
    ("\\frac{1}{2}", "\\boxed{\\tfrac12}", True, True, True),
    ("\\frac{1}{2}", "\\boxed{0.5}", True, True, True),
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{3}}", False, False, True),
    ("30^\\circ", "\\boxed{30}", True, True, True),
    ("30^\\circ", "\\boxed{30^\\circ}", True, True, True),
    ("25\\%", "\\boxed{25}", True, True, True),
    ("(-\\infty, 2]", "\\boxed{(-\\infty,2]}", True, True, True),
    ("(-\\infty, 2]", "\\boxed{(-\\infty,2)}", False, False, True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\pi/2)}", True, False, True),
    ("(1,2)", "\\boxed{(2,1)}", False, False, True),
    ("\\text{Monday}", "\\boxed{\\text{Monday}}", True, True, True),
    ("\\text{Monday}", "\\boxed{\\text{Tuesday}}", False, False, True),
    ("2\\sqrt{3}", "\\boxed{2\\sqrt3}", True, True, True),
    ("5", "The answer is 5", True, False, False),
    ("5", "first \\boxed{3}, then \\boxed{5}", True, True, True),
    ("5", "", False, False, False),
    ("5", "\\boxed{}", False, False, True),
]


@pytest.mark.parametrize("gold,prediction,correct,strict,boxed", CASES)
def test_grade_table(gold, prediction, correct, strict, boxed):
    judged = grade(prediction, gold)
    assert (judged.correct, judged.strict, judged.boxed) == (correct, strict, boxed), judged


@pytest.mark.parametrize("text,expected", [
    ("\\boxed{a{b}c}", "a{b}c"),
    ("x \\boxed{1} y \\fbox{2}", "2"),
    ("\\boxed 7.", "7"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("no box here", None),
    ("\\boxed{unclosed", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_pathological_input_times_out_instead_of_hanging():
    started = time.perf_counter()
    judged = grade("\\boxed{9^{9^{9^{9}}}}", "1", timeout=1.0)
    assert not judged.correct
    assert "timed out" in judged.reason
    assert time.perf_counter() - started < 30
    # the worker was replaced: grading still works afterwards
    assert grade("\\boxed{2}", "2").correct


def test_grading_is_safe_from_threads():
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        verdicts = list(pool.map(lambda i: grade(f"\\boxed{{{i}}}", str(i)).correct, range(8)))
    assert all(verdicts)


def test_strict_equal_normalises_like_hendrycks():
    assert strict_equal("\\dfrac{3}{4}", "\\frac34")
    assert strict_equal("10\\%", "10")
    assert not strict_equal("3", "4")
