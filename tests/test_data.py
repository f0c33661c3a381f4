import gzip
import json

import pytest

from rosa2_dspy.math.data import DataError, canonical_subject, load_examples


def test_packaged_splits_have_their_documented_sizes():
    assert len(load_examples("math500")) == 500
    assert len(load_examples("test")) == 5000
    assert len(load_examples("train")) == 7500


def test_examples_carry_all_fields_and_problem_is_the_input():
    ex = load_examples("math500", limit=1)[0]
    for key in ("problem", "solution", "answer", "subject", "level", "unique_id"):
        assert key in ex
    assert set(ex.inputs().keys()) == {"problem"}
    assert ex.unique_id == "test/precalculus/807.json"


def test_filters_by_subject_level_and_ids():
    algebra_l1 = load_examples("test", subjects="algebra", levels="1")
    assert algebra_l1 and all(e.subject == "Algebra" and e.level == 1 for e in algebra_l1)
    two = load_examples("test", levels=[1, 2], subjects=["Number Theory", "counting_and_probability"])
    assert {e.level for e in two} == {1, 2}
    assert {e.subject for e in two} == {"Number Theory", "Counting & Probability"}
    picked = load_examples("math500", ids="test/precalculus/807.json,test/algebra/1547.json")
    assert sorted(e.unique_id for e in picked) == ["test/algebra/1547.json", "test/precalculus/807.json"]


def test_seeded_shuffle_is_reproducible_and_limit_applies_after_it():
    a = [e.unique_id for e in load_examples("math500", seed=3, limit=10)]
    b = [e.unique_id for e in load_examples("math500", seed=3, limit=10)]
    c = [e.unique_id for e in load_examples("math500", seed=4, limit=10)]
    assert a == b and a != c and len(a) == 10


@pytest.mark.parametrize("kwargs,message", [
    ({"split": "nope"}, "unknown split"),
    ({"split": "math500", "subjects": "Astrology"}, "unknown subject"),
    ({"split": "math500", "levels": "6"}, "unknown level"),
    ({"split": "math500", "levels": "one"}, "unknown level"),
])
def test_bad_selection_gives_a_clear_error(kwargs, message):
    with pytest.raises(DataError, match=message):
        load_examples(**kwargs)


def test_users_own_jsonl_with_custom_fields(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"{i}+{i}?", "a": 2 * i, "id": f"mine/{i}"}) for i in range(3)))
    examples = load_examples(data_file=str(path), input_field="q", answer_field="a")
    assert [e.problem for e in examples] == ["0+0?", "1+1?", "2+2?"]
    assert [e.answer for e in examples] == ["0", "2", "4"]
    assert examples[1].unique_id == "mine/1"
    with pytest.raises(DataError, match="input field 'problem' not in the data"):
        load_examples(data_file=str(path))


def test_malformed_and_truncated_files_are_reported(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+')
    with pytest.raises(DataError, match="cannot read data file"):
        load_examples(data_file=str(bad))
    whole = gzip.compress(("\n".join(json.dumps({"problem": "p" * 50, "answer": i}) for i in range(2000))).encode())
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match="cannot read data file"):
        load_examples(data_file=str(cut))
    with pytest.raises(DataError, match="does not exist"):
        load_examples(data_file=str(tmp_path / "missing.jsonl"))


def test_subject_aliases():
    assert canonical_subject("counting-and-probability") == "Counting & Probability"
    assert canonical_subject("PRECALCULUS") == "Precalculus"
