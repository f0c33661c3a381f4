"""Compiled artifacts: a program's learned words (DSPy state JSON) and weights (a PEFT adapter).

    artifacts/NAME/
        program.json     DSPy program state: instructions and demos of every predictor
        adapter/         PEFT LoRA adapter (safetensors), when the compile moved the weights
        compile.json     how it was made: program spec, model, recipe, data, history, timings

The folder is written under a temporary name and renamed into place, so a crash or a bad
input never leaves a half-written artifact (and an existing one is only replaced when the
new one is complete).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import dspy

from rosa2_dspy.fsutil import staged_dir, write_json_atomic


class ArtifactError(ValueError):
    """A compiled artifact that is missing or unusable (one line, exit 2)."""


def instructions_of(program: dspy.Module) -> dict[str, str]:
    return {name: predictor.signature.instructions for name, predictor in program.named_predictors()}


def save_compiled(out: str | os.PathLike, program: dspy.Module, engine, meta: dict) -> Path:
    target = Path(out)
    with staged_dir(target) as staging:
        stripped = program.deepcopy()
        stripped.set_lm(None)  # the LM is the engine: recorded in compile.json, not pickled
        stripped.save(str(staging / "program.json"))
        has_adapter = engine.has_adapter and engine.weights_id != engine.base_fingerprint
        if has_adapter:
            engine.save_adapter(staging / "adapter")
        write_json_atomic(staging / "compile.json", {**meta, "instructions": instructions_of(program),
                                                     "adapter": "adapter" if has_adapter else None,
                                                     "weights_id": engine.weights_id})
    return target


def read_meta(path: str | os.PathLike) -> dict:
    path = Path(path)
    meta_file = path / "compile.json"
    if not meta_file.is_file() or not (path / "program.json").is_file():
        raise ArtifactError(f"{path} is not a compiled artifact (expected compile.json and program.json); "
                            "make one with `rosa2 compile ... --out {path}`")
    try:
        return json.loads(meta_file.read_text())
    except json.JSONDecodeError:
        raise ArtifactError(f"{meta_file} is not valid JSON") from None


def load_compiled(path: str | os.PathLike, program: dspy.Module, engine) -> dict:
    """Load the artifact's words into ``program`` and its adapter into ``engine``; returns compile.json."""
    path = Path(path)
    meta = read_meta(path)
    program.load(str(path / "program.json"))
    if meta.get("adapter"):
        engine.load_adapter(path / meta["adapter"])
    return meta
