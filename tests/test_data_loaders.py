"""Loaders: good files normalise as documented; bad rows name file, row and field or are skipped and counted."""

import json
import logging
import pathlib

import pytest

from ophsd_jax.data.errors import DataError
from ophsd_jax.data.load_lawbench import load_lawbench
from ophsd_jax.data.load_math import load_gsm8k_jsonl, load_math_json, split_gsm8k_answer
from ophsd_jax.data.load_uspto import load_uspto_csv, load_uspto_json
from ophsd_jax.data.sources import load_source, split_examples

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def write_json(tmp_path, name, obj):
    return write(tmp_path, name, json.dumps(obj, ensure_ascii=False))


# ---------------------------------------------------------------- good files


def test_math_paper_schema():
    examples, report = load_math_json(FIXTURES / "math_paper.json")
    assert report.rows_read == 6 and report.num_skipped == 0
    assert examples[0] == {
        "id": "math_paper-000001",
        "question": examples[0]["question"],
        "answer": "\\frac{5}{6}",
        "solution": "Use the common denominator 6: $\\frac{3}{6} + \\frac{2}{6} = \\frac{5}{6}$.",
        "source": "math_json",
    }
    assert examples[5]["solution"] == ""


def test_gsm8k_answer_split():
    solution, final = split_gsm8k_answer("Half is 1200 / 2 = <<1200/2=600>>600.\n#### 1,200")
    assert solution == "Half is 1200 / 2 = 600."
    assert final == "1200"
    assert split_gsm8k_answer("no marker") is None


def test_gsm8k_loader():
    examples, _ = load_gsm8k_jsonl(FIXTURES / "gsm8k_small.jsonl")
    assert len(examples) == 8
    assert examples[2]["answer"] == "210"
    assert examples[2]["solution"] == "Two weeks are 2 * 7 = 14 days.\nHe reads 14 * 15 = 210 pages."
    assert examples[6]["answer"] == "1200"  # thousands separator removed
    assert examples[0]["id"] == "gsm8k_small-000001"


def test_lawbench_loader_both_schemas():
    examples, _ = load_lawbench(FIXTURES / "lawbench_small.json")
    assert len(examples) == 14
    multi = examples[10]
    assert multi["labels"] == ["盗窃", "诈骗"] and multi["answer"] == "盗窃;诈骗"
    assert multi["fact"].startswith("被告人蒋某") and multi["question"].startswith("事实:")
    paper, _ = load_lawbench(FIXTURES / "cail_paper_small.json")
    assert [e["labels"] for e in paper] == [["盗窃"], ["盗窃"], ["盗窃"], ["诈骗"]]
    assert paper[0]["fact"] == examples[0]["fact"]


def test_uspto_loaders():
    examples, _ = load_uspto_csv(FIXTURES / "uspto_small.csv")
    assert len(examples) == 14
    first = examples[0]
    assert first["labels"] == ["1"] and first["class"] == 1 and first["answer"] == "1"
    assert first["class_name"] == "heteroatom alkylation and arylation"
    assert first["id"] == "uspto_small-000002"  # CSV line 2: line 1 is the header
    paper, _ = load_uspto_json(FIXTURES / "uspto_paper_small.json")
    assert [e["class"] for e in paper] == [1, 1, 2, 2, 3, 3]
    assert paper[0]["patent_id"] == "US0000000A1"


def test_shared_files_load(shared_data):
    law, r1 = load_lawbench(shared_data / "lawbench" / "3-3_zero_shot.json")
    usp, r2 = load_uspto_csv(shared_data / "uspto" / "schneider_dataSetA.csv")
    gsm, r3 = load_gsm8k_jsonl(shared_data / "gsm8k" / "train.jsonl")
    assert (len(law), len(usp), len(gsm)) == (500, 683, 7473)
    assert r1.num_skipped == r2.num_skipped == r3.num_skipped == 0
    counts = {}
    for e in usp:
        counts[e["class"]] = counts.get(e["class"], 0) + 1
    # Class counts documented in shared/data/README.md.
    assert counts == {9: 171, 1: 108, 3: 108, 6: 66, 2: 54, 4: 47, 5: 33, 7: 33, 8: 33, 10: 30}
    assert sum(len(e["labels"]) > 1 for e in law) == 167


# ---------------------------------------------------------------- bad data


def expect_error(load, path, row, field, fragment):
    with pytest.raises(DataError) as info:
        load(path)
    err = info.value
    assert err.path == str(path)
    assert err.row == row
    assert err.field == field
    assert fragment in str(err)
    assert str(path) in str(err)
    return err


def test_math_missing_field(tmp_path):
    path = write_json(tmp_path, "m.json", [{"question": "1+1?", "answer": "2"}, {"question": "2+2?"}])
    expect_error(load_math_json, path, 2, "answer", "missing field")


def test_math_empty_text(tmp_path):
    path = write_json(tmp_path, "m.json", [{"question": "   ", "answer": "2"}])
    expect_error(load_math_json, path, 1, "question", "empty text")


def test_math_wrong_types(tmp_path):
    path = write_json(tmp_path, "m.json", [{"question": ["1+1?"], "answer": "2"}])
    expect_error(load_math_json, path, 1, "question", "expected text, got list")
    path = write_json(tmp_path, "m2.json", [{"question": "q", "answer": {"v": 2}}])
    expect_error(load_math_json, path, 1, "answer", "expected text, got dict")
    path = write_json(tmp_path, "m3.json", [["q", "a"]])
    expect_error(load_math_json, path, 1, None, "expected an object")
    # A bare number is a fine answer.
    path = write_json(tmp_path, "m4.json", [{"question": "q", "answer": 2}])
    assert load_math_json(path)[0][0]["answer"] == "2"


def test_malformed_json_document(tmp_path):
    path = write(tmp_path, "m.json", '[{"question": "q", "answer": "1"},\n{"question": "q2" "answer": "2"}]')
    expect_error(load_math_json, path, 2, None, "invalid JSON")


def test_malformed_jsonl_line_raise_and_skip(tmp_path, caplog):
    good = json.dumps({"question": "q", "answer": "a\n#### 3"})
    path = write(tmp_path, "g.jsonl", f"{good}\n{{not json\n\n{good}\n")
    expect_error(load_gsm8k_jsonl, path, 2, None, "invalid JSON")
    with caplog.at_level(logging.WARNING):
        examples, report = load_gsm8k_jsonl(path, on_error="skip")
    assert len(examples) == 2 and report.num_skipped == 1 and report.rows_read == 3
    assert [e["id"] for e in examples] == ["g-000001", "g-000004"]
    assert "line 2" in caplog.text and "skipped 1 of 3 rows" in caplog.text


def test_gsm8k_missing_final_answer(tmp_path):
    path = write(tmp_path, "g.jsonl", json.dumps({"question": "q", "answer": "no final marker"}) + "\n")
    expect_error(load_gsm8k_jsonl, path, 1, "answer", "####")


def test_lawbench_bad_answer_formats(tmp_path):
    rows = [
        {"instruction": "i", "question": "事实:甲盗窃。", "answer": "盗窃"},  # no 罪名: prefix
        {"instruction": "i", "question": "事实:乙诈骗。", "answer": "罪名:"},  # nothing after it
        {"instruction": "i", "question": "事实:", "answer": "罪名:盗窃"},  # no facts
        {"instruction": "i", "question": "事实:丙抢劫。", "answer": "罪名:抢劫", "accusations": "抢劫"},
    ]
    for i, (row, field, fragment) in enumerate(zip(rows, ["answer", "answer", "question", "accusations"],
                                                   ["罪名:", "no accusation", "no case facts", "expected a list"])):
        path = write_json(tmp_path, f"l{i}.json", [row])
        expect_error(load_lawbench, path, 1, field, fragment)


def test_uspto_unknown_class_and_bad_values(tmp_path):
    header = "rxn_Class,patentID,rxn_Smiles,reactantSet\n"
    path = write(tmp_path, "u.csv", header + "1,P1,CC>>CO,x\n11,P2,CC>>CO,x\n")
    expect_error(load_uspto_csv, path, 3, "rxn_Class", "unknown reaction class 11")
    path = write(tmp_path, "u2.csv", header + "abc,P1,CC>>CO,x\n")
    expect_error(load_uspto_csv, path, 2, "rxn_Class", "expected an integer")
    path = write(tmp_path, "u3.csv", header + "3,P1,CCO,x\n")
    expect_error(load_uspto_csv, path, 2, "rxn_Smiles", "not a reaction SMILES")
    path = write(tmp_path, "u4.csv", header + "3,P1,,x\n")
    expect_error(load_uspto_csv, path, 2, "rxn_Smiles", "empty text")
    path = write_json(tmp_path, "u5.json", [{"rxn_smiles": "CC>>CO", "class": 0}])
    expect_error(load_uspto_json, path, 1, "class", "unknown reaction class 0")
    path = write_json(tmp_path, "u6.json", [{"rxn_smiles": "CC>>CO", "class": True}])
    expect_error(load_uspto_json, path, 1, "class", "expected an integer")


def test_malformed_csv_lines_raise_and_skip(tmp_path, caplog):
    header = "rxn_Class,patentID,rxn_Smiles,reactantSet\n"
    body = "1,P1,CC>>CO,x\n2,P2,CC>>CO\n3,P3,\"CC>>CO\nstill quoted\",x\n4,P4,CC>>CN,x\n"
    path = write(tmp_path, "u.csv", header + body)
    expect_error(load_uspto_csv, path, 3, None, "malformed CSV line: 3 values for 4 columns")
    with caplog.at_level(logging.WARNING):
        examples, report = load_uspto_csv(path, on_error="skip")
    # Line 4-5 is one quoted record whose SMILES contains a newline: not a reaction SMILES.
    assert [e["class"] for e in examples] == [1, 4]
    assert report.num_skipped == 2 and report.rows_read == 4
    assert [(e.row, e.field) for e in report.skipped] == [(3, None), (4, "rxn_Smiles")]
    assert "skipped 2 of 4 rows" in caplog.text


def test_csv_missing_column(tmp_path):
    path = write(tmp_path, "u.csv", "rxn_Class,patentID\n1,P1\n")
    expect_error(load_uspto_csv, path, 1, "rxn_Smiles", "missing column")


def test_missing_file(tmp_path):
    expect_error(load_math_json, tmp_path / "nope.json", None, None, "file not found")


def test_skip_mode_counts_every_kind_of_bad_row(tmp_path):
    rows = [
        {"question": "ok", "answer": "1"},
        {"question": "no answer"},
        {"question": "", "answer": "1"},
        {"question": 5, "answer": "1"},
        "not an object",
        {"question": "ok too", "answer": "2", "solution": "s"},
    ]
    path = write_json(tmp_path, "m.json", rows)
    examples, report = load_math_json(path, on_error="skip")
    assert [e["question"] for e in examples] == ["ok", "ok too"]
    assert [(e.row, e.field) for e in report.skipped] == [(2, "answer"), (3, "question"), (4, "question"), (5, None)]
    assert report.to_dict()["num_skipped"] == 4


def test_bad_on_error_value(tmp_path):
    with pytest.raises(ValueError, match="on_error"):
        load_math_json(FIXTURES / "math_paper.json", on_error="ignore")


# ---------------------------------------------------------------- sources and splits


def test_split_is_deterministic_and_partitions():
    examples = [{"id": str(i), "question": f"q{i}"} for i in range(50)]
    train, val = split_examples(examples, 0.2, seed=3)
    again_train, again_val = split_examples(examples, 0.2, seed=3)
    other_train, _ = split_examples(examples, 0.2, seed=4)
    assert (train, val) == (again_train, again_val)
    assert len(val) == 10 and len(train) == 40
    assert sorted(e["id"] for e in train + val) == sorted(e["id"] for e in examples)
    assert [int(e["id"]) for e in train] == sorted(int(e["id"]) for e in train)  # file order kept
    assert train != other_train
    assert len(split_examples(examples, 7, seed=0)[1]) == 7
    with pytest.raises(ValueError):
        split_examples(examples, 50, seed=0)


def test_split_never_trains_on_a_copy_of_a_validation_example():
    # 60 rows, 20 distinct problems (ids differ, content repeats), as small generated
    # problems do: no validation problem may reach the training split.
    examples = [{"id": f"r{i}", "source": "gen", "question": f"{i % 20} + 1", "answer": str(i % 20 + 1)}
                for i in range(60)]
    train, val = split_examples(examples, 5, seed=0)
    assert len(val) == 5
    held_out = {e["question"] for e in val}
    assert not held_out & {e["question"] for e in train}
    assert len(train) == 60 - 5 - sum(e["question"] in held_out for e in examples if e not in val)
    assert {e["question"] for e in train} | held_out == {e["question"] for e in examples}
    with pytest.raises(ValueError, match="every training example is a copy"):
        split_examples([{"id": str(i), "question": "same"} for i in range(4)], 1, seed=0)


def test_source_specs(tmp_path):
    ml_collections = pytest.importorskip("ml_collections")
    spec = ml_collections.ConfigDict({"kind": "lawbench_json", "path": str(FIXTURES / "lawbench_small.json")})
    assert len(load_source(spec)[0]) == 14
    examples, report = load_source({"kind": "uspto_csv", "path": str(FIXTURES / "uspto_small.csv")})
    assert len(examples) == 14 and report["num_skipped"] == 0
    with pytest.raises(ValueError, match="unknown kind"):
        load_source({"kind": "parquet", "path": "x"})
    with pytest.raises(ValueError, match="unknown keys"):
        load_source({"kind": "uspto_csv", "path": "x", "on_eror": "skip"})


def test_reasoning_gym_source_has_checked_worked_solutions():
    examples, report = load_source({"kind": "reasoning_gym", "size": 30, "seed": 5})
    assert report is None and len(examples) == 30
    assert {e["source"] for e in examples} == {
        "reasoning_gym/chain_sum", "reasoning_gym/products", "reasoning_gym/gsm_symbolic"
    }
    for e in examples:
        assert e["solution"].endswith(f"The answer is {e['answer']}.")
    again, _ = load_source({"kind": "reasoning_gym", "size": 30, "seed": 5, "on_error": "skip"})
    assert again == examples
    # generated in a child process (see below): the same as generating here
    from ophsd_jax.data.generated_math import generate_math_problems

    assert examples == generate_math_problems(30, 5)


def test_the_trainer_process_does_not_keep_heavy_optional_imports(tmp_path):
    """Generating reasoning-gym data, writing metrics (tensorboardX) and building the
    Plan-Solve harness leave reasoning-gym (sympy, matplotlib), torch and scikit-learn out
    of the process: each would stay resident for the whole run (~0.1-0.2 GB each)."""
    import subprocess
    import sys

    code = f"""
import sys
from ophsd_jax import runtime
from ophsd_jax.data.sources import load_source
from ophsd_jax.data.tasks import make_task
from ophsd_jax.harnesses.factory import make_harness
from ophsd_jax.metrics import MetricsWriter
examples, _ = load_source({{"kind": "reasoning_gym", "size": 6, "seed": 1}})
make_harness("plan_solve", make_task("math"), {{}}, train_examples=examples)
w = MetricsWriter({str(tmp_path)!r}); w.write(1, {{"loss": 1.0}})
import os
assert os.listdir({str(tmp_path / "tensorboard")!r})  # TensorBoard events were written
print(sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "sklearn", "reasoning_gym", "sympy", "matplotlib"}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_reasoning_gym_difficulty_options():
    """Per-family generator settings change the problems (checked from the expressions
    themselves), leave the other families as they were, and bad settings fail naming them."""
    import re

    from ophsd_jax.data.sources import fingerprint

    base = {"kind": "reasoning_gym", "size": 40, "seed": 3, "families": ["chain_sum", "products"]}
    easy = {**base, "options": {"chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}}}
    plain, _ = load_source(base)
    assert load_source({**base, "options": {}})[0] == plain  # empty options: the same data
    assert fingerprint({**base, "options": {}}, {}) == fingerprint(base, {})
    assert fingerprint(easy, {}) != fingerprint(base, {})
    examples, _ = load_source(easy)
    sums = [e for e in examples if e["source"] == "reasoning_gym/chain_sum"]
    assert len(sums) == 20
    for e in sums:  # two one-digit terms: "a + b" or "a - b", both operands < 10
        operands = [int(x) for x in re.findall(r"\d+", e["solution"].splitlines()[1].split("=")[0])]
        assert len(operands) == 2 and max(operands) < 10
    # the default has bigger numbers (up to 4 digits)
    assert max(abs(int(e["answer"])) for e in plain if e["source"] == "reasoning_gym/chain_sum") >= 100
    assert [e for e in examples if "products" in e["source"]] == [e for e in plain if "products" in e["source"]]
    with pytest.raises(ValueError, match="not among the families"):
        load_source({**base, "options": {"gsm_symbolic": {"difficulty": 1.0}}})
    with pytest.raises(ValueError, match="options for chain_sum"):
        load_source({**base, "options": {"chain_sum": {"max_term": 2}}})
    with pytest.raises(ValueError, match="set by the source spec"):
        load_source({**base, "options": {"chain_sum": {"seed": 1}}})


def test_worked_solution_writers():
    from ophsd_jax.data.generated_math import chain_sum_solution, product_solution

    text, value = chain_sum_solution("57 + 87 - 70")
    assert value == 74 and "57 + 87 = 144." in text and "144 - 70 = 74." in text
    text, value = product_solution("123 * 45")
    assert value == 5535
    assert "123 * 40 = 4920." in text and "123 * 5 = 615." in text and "4920 + 615 = 5535" in text
    assert product_solution("7 * 0")[1] == 0
