"""The example prompt program: (optionally) clarify the problem, then solve it with a boxed answer.

    rosa2 eval --program programs/math_solver.py --split math500 --limit 20

Single pass by default; ``clarify=True`` runs the Clarify module first (it also sees any
feedback from earlier turns), which is how ROSA2 sessions use it.
"""

import dspy

from rosa2_dspy.adapters import make_adapter
from rosa2_dspy.signatures import Answer, Clarify


class MathSolver(dspy.Module):
    def __init__(self, clarify: bool = False, adapter: str = "boxed"):
        super().__init__()
        self.clarify = dspy.Predict(Clarify)
        self.answer = dspy.ChainOfThought(Answer)
        self.use_clarify = clarify
        self.adapter = make_adapter(adapter)

    def forward(self, problem: str, feedback: str = "") -> dspy.Prediction:
        with dspy.context(adapter=self.adapter):
            statement = problem
            if self.use_clarify:
                statement = self.clarify(problem=problem, feedback=feedback).clarified_problem
            solved = self.answer(problem=statement)
        return dspy.Prediction(answer=solved.answer, reasoning=solved.reasoning, clarified_problem=statement)


program = MathSolver
