"""Writing files and folders atomically: fill a staging file or folder beside the target, then rename
it into place. A crash or an error leaves the target as it was, never half-written. The one place for
this in the package (results, summaries, reports, plots, artifacts, adapters, model caches); and for
the append-only JSONL logs a long run keeps (results, remembered replies, segments), which a killed
writer may leave with a torn last line (:func:`read_jsonl`, :func:`append_jsonl`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def staged_file(target: str | os.PathLike):
    """Yield a temporary path beside ``target`` (same suffix, so writers that go by it still work); on
    success it is renamed over ``target``, on any exception it is deleted and ``target`` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    staging = Path(name)
    try:
        yield staging
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with staged_file(path) as staging:
        staging.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def read_jsonl(path: str | os.PathLike, *, repair: bool = False) -> list:
    """The records of a JSONL file, in order: every line that parses (a line torn by a killed writer, or an
    empty one, is skipped). ``repair``: rewrite the file (atomically) without the lines skipped. A file that
    does not exist has no records."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_text(encoding="utf-8")
    records, kept = [], []
    for line in raw.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
        kept.append(line)
    clean = "".join(line + "\n" for line in kept)
    if repair and clean != raw:
        write_text_atomic(path, clean)
    return records


def append_jsonl(path: str | os.PathLike, record: Any, *, durable: bool = False) -> None:
    """Append ``record`` as one JSON line. A torn last line (no newline: its writer was killed) is ended
    first, so the new record is a line of its own. ``durable``: fsync before returning."""
    line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
    with open(path, "ab+") as handle:
        if handle.tell():
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                line = b"\n" + line
        handle.write(line)
        handle.flush()
        if durable:
            os.fsync(handle.fileno())


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike, keep_existing: bool = False):
    """Yield an empty staging folder; on success it replaces ``target`` (an old one is removed only
    after the rename; with ``keep_existing`` an existing ``target`` wins and the staging folder is
    dropped, for caches that another process may have finished first), on any exception it is deleted
    and ``target`` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        if keep_existing and target.exists():
            shutil.rmtree(staging, ignore_errors=True)
            return
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:6]}")
            os.replace(target, old)
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
