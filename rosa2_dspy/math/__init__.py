"""MATH: packaged splits, grading, feedback, simulated users and sharded problems.

Names are imported on first use, so that importing a submodule (the grading worker imports
``rosa2_dspy.math.grading`` alone) does not pull in DSPy and the data loaders.
"""

import importlib

_EXPORTS = {"SPLITS": "data", "SUBJECTS": "data", "DataError": "data", "load_examples": "data",
            "Grade": "grading", "grade": "grading", "last_boxed": "grading", "strict_equal": "grading",
            "math_feedback": "feedback", "math_feedback_metric": "feedback"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
