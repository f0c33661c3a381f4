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


# equal values that only math-verify can tell (the strict match says no): a silent fallback shows here
VERIFY_ONLY = [("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\pi/2)}"),
               ("x^2+2x+1", "\\boxed{(x+1)^2}"), ("5", "The answer is 5")]


def test_after_a_pathological_answer_the_next_50_grades_come_from_math_verify_in_normal_time():
    from rosa2_dspy.math import grading

    started = time.perf_counter()
    judged = grade("\\boxed{9^{9^{9^{9}}}}", "1", timeout=1.0)
    assert not judged.correct and judged.fallback and "timed out" in judged.reason
    assert time.perf_counter() - started < 30
    workers = grading._WORKER.started
    started = time.perf_counter()
    # the replacement starts (spawn, imports: about 1 s) before this grade's 0.5 s begin; the grade takes 5 ms
    first = grade("The answer is 5", "5", timeout=0.5)
    verdicts = [first] + [grade(p, g) for _ in range(17) for g, p in VERIFY_ONLY][:49]
    assert grading._WORKER.started == workers + 1  # one replacement, warmed before its first answer
    assert all(v.correct and not v.strict and not v.fallback for v in verdicts), [v for v in verdicts if v.fallback]
    assert time.perf_counter() - started < 50 * 0.5  # normal time: nowhere near a timeout per grade


def test_the_grading_worker_imports_neither_dspy_nor_torch():
    import subprocess
    import sys

    code = "import sys, rosa2_dspy.math.grading; print('dspy' in sys.modules or 'torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_grading_is_safe_from_threads():
    from concurrent.futures import ThreadPoolExecutor

    cases = VERIFY_ONLY * 3
    with ThreadPoolExecutor(4) as pool:
        verdicts = list(pool.map(lambda case: grade(case[1], case[0]), cases))
    assert all(v.correct and not v.strict and not v.fallback for v in verdicts)


def test_strict_equal_normalises_like_hendrycks():
    assert strict_equal("\\dfrac{3}{4}", "\\frac34")
    assert strict_equal("10\\%", "10")
    assert not strict_equal("3", "4")
