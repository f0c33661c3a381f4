"""Atomic writes (rosa2_dspy/fsutil.py): the one place that writes files and folders for the package."""

import json

import pytest

from rosa2_dspy.fsutil import append_jsonl, read_jsonl, staged_dir, staged_file, write_json_atomic


def test_a_failed_write_leaves_the_old_file_and_no_staging_file(tmp_path):
    target = tmp_path / "summary.json"
    write_json_atomic(target, {"accuracy": 0.5})
    with pytest.raises(RuntimeError), staged_file(target) as staging:
        staging.write_text('{"accur')  # half-written, then the writer fails
        raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"accuracy": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    with staged_file(tmp_path / "plot.png") as staging:
        assert staging.suffix == ".png"  # matplotlib picks the format by it
        staging.write_bytes(b"png")
    assert (tmp_path / "plot.png").read_bytes() == b"png"


def test_staged_folders_replace_or_keep_an_existing_target(tmp_path):
    target = tmp_path / "cache"
    with staged_dir(target) as staging:
        (staging / "a").write_text("first")
    with staged_dir(target) as staging:
        (staging / "a").write_text("second")
    assert (target / "a").read_text() == "second"
    with staged_dir(target, keep_existing=True) as staging:  # another process finished first: theirs stays
        (staging / "a").write_text("third")
    assert (target / "a").read_text() == "second"
    with pytest.raises(KeyboardInterrupt), staged_dir(target) as staging:
        (staging / "a").write_text("torn")
        raise KeyboardInterrupt
    assert (target / "a").read_text() == "second" and sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_a_jsonl_log_survives_a_writer_killed_mid_line(tmp_path):
    """A run killed while appending leaves a torn last line: reading skips it, the next record still gets a
    line of its own, and ``repair`` rewrites the file without it."""
    log = tmp_path / "results.jsonl"
    assert read_jsonl(log) == []
    append_jsonl(log, {"unique_id": "a"})
    log.write_text(log.read_text() + '{"unique_id": "b", "ans')  # killed mid-line
    assert read_jsonl(log) == [{"unique_id": "a"}]
    append_jsonl(log, {"unique_id": "c", "text": "é"}, durable=True)
    assert read_jsonl(log) == [{"unique_id": "a"}, {"unique_id": "c", "text": "é"}]
    assert len(log.read_text(encoding="utf-8").splitlines()) == 3  # the torn line stays until repaired
    assert read_jsonl(log, repair=True) == read_jsonl(log)
    assert log.read_text(encoding="utf-8") == '{"unique_id": "a"}\n{"unique_id": "c", "text": "é"}\n'
