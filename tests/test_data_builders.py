"""tfds builders (read back without TensorFlow) and the resumable batch iterator."""

import json
import pathlib
import shutil
import sys

import pytest

from ophsd_jax.data.builders import build_dataset
from ophsd_jax.data.errors import DataError
from ophsd_jax.data.iterator import ExampleIterator
from ophsd_jax.data.sources import load_source, split_examples

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

FIXTURE_SPECS = [
    ("math", {"kind": "math_json", "path": str(FIXTURES / "math_paper.json")}),
    ("math", {"kind": "gsm8k_jsonl", "path": str(FIXTURES / "gsm8k_small.jsonl")}),
    ("math", {"kind": "reasoning_gym", "size": 40, "seed": 1}),
    ("lawbench", {"kind": "lawbench_json", "path": str(FIXTURES / "lawbench_small.json")}),
    ("lawbench", {"kind": "lawbench_json", "path": str(FIXTURES / "cail_paper_small.json")}),
    ("uspto", {"kind": "uspto_csv", "path": str(FIXTURES / "uspto_small.csv")}),
    ("uspto", {"kind": "uspto_json", "path": str(FIXTURES / "uspto_paper_small.json")}),
]


def all_items(source):
    return [source[i] for i in range(len(source))]


@pytest.mark.parametrize("task,spec", FIXTURE_SPECS, ids=[s["kind"] + str(i) for i, (_, s) in enumerate(FIXTURE_SPECS)])
def test_build_from_fixtures_matches_loader(tmp_path, task, spec):
    splits, _ = build_dataset(task, spec, data_dir=tmp_path, validation_size=0.25, split_seed=7)
    # Independent reference: the loader output split the same way, in memory.
    examples, _ = load_source(spec)
    train, val = split_examples(examples, 0.25, seed=7)
    assert all_items(splits["train"]) == train
    assert all_items(splits.get("validation", [])) == val
    assert "tensorflow" not in sys.modules  # as_data_source() needs no TensorFlow


def test_a_build_leaves_nothing_in_the_temp_dir(tmp_path, monkeypatch):
    import tempfile

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    splits, _ = build_dataset("uspto", {"kind": "uspto_csv", "path": str(FIXTURES / "uspto_small.csv")},
                              data_dir=tmp_path / "data", validation_size=0.25, split_seed=7)
    assert len(splits["train"]) > 0
    assert list(temp.iterdir()) == []


def test_build_from_shared_files(tmp_path, shared_data):
    cases = [
        ("lawbench", {"kind": "lawbench_json", "path": str(shared_data / "lawbench" / "3-3_zero_shot.json")}, 100, 500),
        ("uspto", {"kind": "uspto_csv", "path": str(shared_data / "uspto" / "schneider_dataSetA.csv")}, 83, 683),
        ("math", {"kind": "gsm8k_jsonl", "path": str(shared_data / "gsm8k" / "train.jsonl")}, 473, 7473),
    ]
    for task, spec, n_val, n_all in cases:
        splits, report = build_dataset(task, spec, data_dir=tmp_path, validation_size=n_val, split_seed=0)
        assert len(splits["validation"]) == n_val
        assert len(splits["train"]) + n_val == n_all
        assert report["rows_read"] == n_all and report["num_skipped"] == 0
    law, _ = build_dataset("lawbench", cases[0][1], data_dir=tmp_path, validation_size=100, split_seed=0)
    assert all(e["labels"] for e in all_items(law["validation"]))


def test_rebuild_is_cached_and_file_changes_rebuild(tmp_path):
    src = tmp_path / "math.json"
    shutil.copy(FIXTURES / "math_paper.json", src)
    spec = {"kind": "math_json", "path": str(src)}
    first, _ = build_dataset("math", spec, data_dir=tmp_path / "d", validation_size=0)
    assert len(first["train"]) == 6
    again, _ = build_dataset("math", spec, data_dir=tmp_path / "d", validation_size=0)
    assert all_items(again["train"]) == all_items(first["train"])
    rows = json.loads(src.read_text())[:3]
    src.write_text(json.dumps(rows))
    changed, _ = build_dataset("math", spec, data_dir=tmp_path / "d", validation_size=0)
    assert len(changed["train"]) == 3


def test_skip_report_is_saved_with_the_dataset(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text(
        json.dumps({"question": "q1", "answer": "x\n#### 1"}) + "\n{broken\n"
        + json.dumps({"question": "q2", "answer": "no marker"}) + "\n"
        + json.dumps({"question": "q3", "answer": "y\n#### 3"}) + "\n"
    )
    spec = {"kind": "gsm8k_jsonl", "path": str(src), "on_error": "skip"}
    splits, report = build_dataset("math", spec, data_dir=tmp_path / "d", validation_size=0)
    assert len(splits["train"]) == 2
    assert report["num_skipped"] == 2 and "line 2" in report["skipped"][0] and "line 3" in report["skipped"][1]
    _, reopened = build_dataset("math", spec, data_dir=tmp_path / "d", validation_size=0)
    assert reopened == report
    with pytest.raises(DataError, match="line 2"):
        build_dataset("math", dict(spec, on_error="raise"), data_dir=tmp_path / "d2", validation_size=0)


def test_source_kind_must_fit_task(tmp_path):
    with pytest.raises(ValueError, match="does not fit task"):
        build_dataset("lawbench", {"kind": "uspto_csv", "path": str(FIXTURES / "uspto_small.csv")}, data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown task"):
        build_dataset("chess", {"kind": "uspto_csv", "path": "x"}, data_dir=tmp_path)


# ---------------------------------------------------------------- iterator


def ids(batches):
    return [[e["id"] for e in b] for b in batches]


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


EXAMPLES = [{"id": f"e{i}", "question": str(i)} for i in range(10)]


def test_iterator_is_deterministic_for_a_seed():
    a = take(ExampleIterator(EXAMPLES, 3, seed=11), 12)
    b = take(ExampleIterator(EXAMPLES, 3, seed=11), 12)
    c = take(ExampleIterator(EXAMPLES, 3, seed=12), 12)
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)


def test_iterator_epochs_are_permutations():
    it = ExampleIterator(EXAMPLES, 4, seed=0, drop_remainder=False, num_epochs=3)
    batches = list(it)
    assert [len(b) for b in batches] == [4, 4, 2] * 3
    epochs = [sum(ids(batches[i * 3 : i * 3 + 3]), []) for i in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(e["id"] for e in EXAMPLES)
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    dropping = list(ExampleIterator(EXAMPLES, 4, seed=0, num_epochs=2))
    assert [len(b) for b in dropping] == [4, 4, 4, 4]
    ordered = list(ExampleIterator(EXAMPLES, 5, seed=0, shuffle=False, num_epochs=1))
    assert ids(ordered) == [[f"e{i}" for i in range(5)], [f"e{i}" for i in range(5, 10)]]


@pytest.mark.parametrize("consumed", [0, 1, 2, 3, 5, 7])
def test_iterator_resumes_exactly(consumed):
    reference = take(ExampleIterator(EXAMPLES, 3, seed=5), consumed + 8)
    it = ExampleIterator(EXAMPLES, 3, seed=5)
    take(it, consumed)
    saved = json.loads(json.dumps(it.state()))  # must survive JSON
    fresh = ExampleIterator(EXAMPLES, 3, seed=5)
    fresh.restore(saved)
    assert ids(take(fresh, 8)) == ids(reference[consumed:])


def test_iterator_restore_rejects_other_settings():
    it = ExampleIterator(EXAMPLES, 3, seed=5)
    take(it, 2)
    state = it.state()
    with pytest.raises(ValueError, match="seed"):
        ExampleIterator(EXAMPLES, 3, seed=6).restore(state)
    with pytest.raises(ValueError, match="size"):
        ExampleIterator(EXAMPLES[:9], 3, seed=5).restore(state)
    with pytest.raises(ValueError, match="batch_size"):
        ExampleIterator(EXAMPLES, 2, seed=5).restore(state)
    with pytest.raises(ValueError, match="missing keys"):
        ExampleIterator(EXAMPLES, 3, seed=5).restore({"epoch": 0})
    with pytest.raises(ValueError, match="never yield"):
        ExampleIterator(EXAMPLES, 11, seed=5)


def test_iterator_over_built_dataset_resumes(tmp_path):
    spec = {"kind": "lawbench_json", "path": str(FIXTURES / "lawbench_small.json")}
    splits, _ = build_dataset("lawbench", spec, data_dir=tmp_path, validation_size=4)
    it = ExampleIterator(splits["train"], 4, seed=2)
    reference = take(ExampleIterator(splits["train"], 4, seed=2), 9)
    take(it, 4)
    resumed = ExampleIterator(splits["train"], 4, seed=2)
    resumed.restore(it.state())
    assert ids(take(resumed, 5)) == ids(reference[4:])
    assert all(isinstance(e["labels"], list) for b in reference for e in b)
