"""rosa2-dspy: co-adapting the words and the weights of a language model (ROSA2) with DSPy."""

__version__ = "0.1.0"
