"""The two signatures every ROSA2 prompt program is built from.

``Clarify`` is the words side at test time: it turns the problem plus the user's feedback
into a clearer problem statement. ``Answer`` solves a problem and boxes its final answer.
Their docstrings are the instructions that the words optimizer rewrites.
"""

import dspy


class Clarify(dspy.Signature):
    """Rewrite the math problem so that it is clear and complete, taking the user's feedback on earlier answers into account. Keep every number, condition and the question asked; state exactly what form the final answer must take. Do not solve the problem."""

    problem: str = dspy.InputField(desc="the original problem")
    feedback: str = dspy.InputField(desc="the user's feedback on earlier answers; empty on the first turn")
    clarified_problem: str = dspy.OutputField(desc="the rewritten problem statement")


class Answer(dspy.Signature):
    """Solve the math problem step by step. End with the final answer written as \\boxed{...}, simplified, in exact form (fractions, radicals, pi) unless the problem asks otherwise."""

    problem: str = dspy.InputField(desc="the problem to solve")
    answer: str = dspy.OutputField(desc="the final answer in \\boxed{}, e.g. \\boxed{\\frac{1}{2}}")
