"""rosa2-dspy: co-adapting the words and the weights of a language model (ROSA2) with DSPy.

The public names are imported on first use (``import rosa2_dspy`` stays light)::

    from rosa2_dspy import LocalEngine, Session, ROSA2, load_examples
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # the engine: a local Hugging Face model served to DSPy, with its LoRA adapter slot
    "LocalEngine": "engine", "LocalLM": "engine",
    # words: the textual-gradient optimizer and the test-time clarification step
    "TextualGradientOptimizer": "words", "refine": "words",
    # weights: LoRA updates through TRL, the compile-time finetune and DSPy's finetune provider
    "LoRAUpdater": "weights", "LoRAFinetune": "weights", "UpdateConfig": "weights", "LocalProvider": "weights",
    "adapter_shift": "weights",
    # both: multi-turn sessions (test time) and the compile-time teleprompter
    "Session": "coadapt", "SessionConfig": "coadapt", "POLICIES": "coadapt", "ROSA2": "teleprompt",
    "Sequential": "teleprompt",
    # MATH: data, grading, simulated users, sharded problems
    "load_examples": "math.data", "grade": "math.grading", "make_user": "math.users", "shard": "math.shards",
    "math_feedback_metric": "math.feedback",
    # experiments: a program evaluated, methods compared, compiled programs saved and loaded
    "evaluate": "experiments", "compare_methods": "experiments", "compile_program": "experiments",
    "load_program": "program_loader", "save_compiled": "artifacts", "load_compiled": "artifacts",
    # reports
    "build_report": "report", "paired_difference": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
