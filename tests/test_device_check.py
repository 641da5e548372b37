"""scripts/device_check.sh --short: the accelerator check script runs end to end here and
writes one JSON line per check, each with a real result."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_device_check_short_mode_writes_every_result(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "scripts/device_check.sh"), "--short"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "device_check.jsonl").read_text().splitlines()]
    by = {r["check"]: r for r in rows}
    assert list(by) == ["model_parity", "attention", "train_step", "sampler", "batching"]
    assert all(r["rc"] == 0 for r in rows), rows
    assert " passed" in by["model_parity"]["summary"] and "failed" not in by["model_parity"]["summary"]
    att = by["attention"]["result"]
    assert att["bench"] == "attention" and att["impls"]["blockwise"]["max_rel_diff"] < 1e-4
    assert by["train_step"]["result"]["mfu"] > 0 and by["sampler"]["result"]["bench"] == "sampler"
    assert by["batching"]["result"]["outputs_equal"] is True  # greedy: continuous = static, token for token
