"""MATH: packaged splits, grading, and (later) simulated users and metrics."""

from rosa2_dspy.math.data import SPLITS, SUBJECTS, DataError, load_examples
from rosa2_dspy.math.grading import Grade, grade, last_boxed, strict_equal

__all__ = ["SPLITS", "SUBJECTS", "DataError", "Grade", "grade", "last_boxed", "load_examples", "strict_equal"]
