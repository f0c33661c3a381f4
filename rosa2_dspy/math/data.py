"""MATH splits packaged with the library, a user's own JSONL file, or a hub dataset, as dspy.Examples.

The splits (train 7,500, test 5,000, MATH-500) ship gzip-compressed inside the package, so a
fresh offline machine has them; see ``data/SOURCE.md`` and ``data/LICENSE.md``. Files are read
through ``datasets`` and become ``dspy.Example``s with the fields ``problem, solution, answer,
subject, level, unique_id`` and ``problem`` as the input.
"""

from __future__ import annotations

import random
from pathlib import Path

import dspy

DATA_DIR = Path(__file__).parent / "data"
SPLITS = {"train": "train.jsonl.gz", "test": "test.jsonl.gz", "math500": "math500.jsonl.gz"}
SUBJECTS = ("Algebra", "Counting & Probability", "Geometry", "Intermediate Algebra", "Number Theory",
            "Prealgebra", "Precalculus")
FIELDS = ("problem", "solution", "answer", "subject", "level", "unique_id")


class DataError(ValueError):
    """Bad data selection or a data file that cannot be read; the message says which."""


def canonical_subject(name: str) -> str:
    """Accept 'Number Theory', 'number_theory', 'number-theory', 'counting_and_probability'..."""
    key = name.strip().lower().replace("_", " ").replace("-", " ").replace(" and ", " & ")
    for subject in SUBJECTS:
        if subject.lower() == key:
            return subject
    raise DataError(f"unknown subject {name!r}; choose from: {', '.join(SUBJECTS)}")


def parse_levels(levels) -> set[int] | None:
    if levels in (None, "", []):
        return None
    items = levels.split(",") if isinstance(levels, str) else list(levels)
    out = set()
    for item in items:
        try:
            level = int(str(item).strip())
        except ValueError:
            raise DataError(f"unknown level {item!r}; levels are integers 1 to 5") from None
        if not 1 <= level <= 5:
            raise DataError(f"unknown level {level}; levels are integers 1 to 5")
        out.add(level)
    return out


def _read_json(path: Path):
    import datasets

    datasets.disable_progress_bars()
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty: give one JSON object per line")
    try:
        return datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for a bad file
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise DataError(f"cannot read data file {path}: {type(cause).__name__}: {(str(cause).splitlines() or ['-'])[0][:160]}") \
            from None


def _to_example(record: dict, input_field: str = "problem", answer_field: str = "answer", index: int = 0):
    problem, answer = record.get(input_field), record.get(answer_field)
    if not isinstance(problem, str) or answer is None:
        raise DataError(f"record {index} has no {input_field!r} text or no {answer_field!r}; "
                        f"its keys are {sorted(record)}")
    fields = {
        "problem": problem,
        "answer": str(answer),
        "solution": record.get("solution") or "",
        "subject": record.get("subject") or "",
        "level": record.get("level"),
        "unique_id": str(record.get("unique_id") or record.get("id") or f"row/{index}"),
    }
    return dspy.Example(**fields).with_inputs("problem")


def load_examples(split: str = "math500", *, data_file: str | None = None, input_field: str = "problem",
                  answer_field: str = "answer", hub_split: str = "test", subjects=None, levels=None,
                  ids=None, limit: int | None = None, seed: int | None = None) -> list[dspy.Example]:
    """Load and filter problems.

    ``split`` is a packaged split (``train``, ``test``, ``math500``) or a hub dataset id
    (``owner/name``, read with ``hub_split``); ``data_file`` reads a user's own JSONL file instead.
    Filters apply in order: subjects, levels, ids; then a seeded shuffle (when ``seed`` is given)
    and ``limit``.
    """
    if data_file is not None:
        path = Path(data_file)
        if not path.is_file():
            raise DataError(f"data file {data_file!r} does not exist")
        rows = _read_json(path)
    elif split in SPLITS:
        rows = _read_json(DATA_DIR / SPLITS[split])
    elif split.count("/") == 1:
        rows = _load_hub(split, hub_split)
    else:
        raise DataError(f"unknown split {split!r}; choose from: {', '.join(SPLITS)} (or a hub id owner/name)")
    if len(rows) and input_field not in rows.column_names:
        raise DataError(f"input field {input_field!r} not in the data; columns are {rows.column_names}")
    if len(rows) and answer_field not in rows.column_names:
        raise DataError(f"answer field {answer_field!r} not in the data; columns are {rows.column_names}")
    examples = [_to_example(r, input_field, answer_field, i) for i, r in enumerate(rows)]
    if subjects:
        wanted = {canonical_subject(s) for s in (subjects.split(",") if isinstance(subjects, str) else subjects)}
        examples = [e for e in examples if e.subject in wanted]
    wanted_levels = parse_levels(levels)
    if wanted_levels:
        examples = [e for e in examples if e.level in wanted_levels]
    if ids:
        wanted_ids = set(ids.split(",") if isinstance(ids, str) else ids)
        examples = [e for e in examples if e.unique_id in wanted_ids]
    if seed is not None:
        random.Random(seed).shuffle(examples)
    if limit is not None:
        if limit < 0:
            raise DataError(f"limit must be >= 0, got {limit}")
        examples = examples[:limit]
    return examples


def _load_hub(dataset_id: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(dataset_id, split=split)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot load hub dataset {dataset_id!r} (split {split!r}): tried the Hugging Face hub: "
                        f"{str(exc).splitlines()[0][:160]}") from None
