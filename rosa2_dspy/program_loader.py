"""Loading a prompt program (a dspy.Module) from a Python file: ``path.py`` or ``path.py:ClassName``."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

import dspy


class ProgramError(ValueError):
    """A program file or class that cannot be loaded; the message says what to fix."""


def load_program_class(spec: str) -> type[dspy.Module]:
    """The dspy.Module class named by ``spec``.

    Without ``:ClassName``, the file's ``program`` attribute is used, else the only
    dspy.Module subclass the file defines.
    """
    path_text, _, class_name = spec.partition(":")
    path = Path(path_text)
    if not path.is_file():
        raise ProgramError(f"program file {path_text!r} does not exist")
    module_name = f"rosa2_program_{path.stem}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ProgramError(f"{path_text!r} is not a Python file")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any error in user code becomes one clear line
        raise ProgramError(f"importing {path_text} failed: {type(exc).__name__}: {exc}") from None
    if class_name:
        cls = getattr(module, class_name, None)
        if cls is None:
            raise ProgramError(f"{path_text} defines no {class_name!r}")
    elif hasattr(module, "program"):
        cls = module.program
    else:
        found = [obj for _, obj in inspect.getmembers(module, inspect.isclass)
                 if issubclass(obj, dspy.Module) and obj.__module__ == module_name]
        if len(found) != 1:
            names = ", ".join(c.__name__ for c in found) or "none"
            raise ProgramError(f"{path_text} must define one dspy.Module (found: {names}); name it as {path_text}:Class")
        cls = found[0]
    if not (inspect.isclass(cls) and issubclass(cls, dspy.Module)):
        raise ProgramError(f"{spec} is not a dspy.Module subclass")
    return cls


def load_program(spec: str, **kwargs) -> dspy.Module:
    cls = load_program_class(spec)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ProgramError(f"cannot construct {cls.__name__}: {exc}") from None
