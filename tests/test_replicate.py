"""The reproduction experiment (`ophsd_jax.experiments.replicate --quick`) end to end on the
tiny random model: every condition trains (or not), evaluates alone and with the harness,
resumes by skipping finished runs, and its results file is recomputed from the records."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(out, *extra):
    # one CPU device, as a user runs it (conftest gives this process 8)
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "ophsd_jax.experiments.replicate", "--config",
                           str(ROOT / "configs" / "tiny.py"), "--out", str(out), "--quick", "--seeds", "0",
                           "--conditions", "base,opsd,ophsd,ophsd_live,ophsd_jsd", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)


def _tiny_config():
    """configs/tiny.py's config (the file is not a package module)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny", ROOT / "configs" / "tiny.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    return tiny.get_config()


def _records(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("replicate")
    proc = _run(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_quick_mode_runs_every_condition_and_writes_the_report(quick):
    out, proc = quick
    results = json.loads((out / "results.json").read_text())
    conds = results["summary"]["conditions"]
    assert list(conds) == ["base", "opsd", "ophsd", "ophsd_live", "ophsd_jsd"]
    assert results["summary"]["examples"] == 4 and results["k"] == 2
    for name, runs in results["runs"].items():
        for r in runs:
            wd = pathlib.Path(r["workdir"])
            trained = name != "base"
            assert any((wd / "checkpoints").glob("[0-9]*")) == trained
            if trained:  # the student-only curve: before training and after each step
                assert [s for s, _ in r["curve"]] == [0, 1, 2]
                assert [s for s, _ in r["loss"]] == [1, 2]
            assert r["wall_seconds"] > 0
    for png in ("student_accuracy_vs_step.png", "student_vs_harness.png", "loss.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in conds) and "3_ophsd_harness_minus_ophsd_student" in table


def test_results_are_recomputed_from_the_per_example_records(quick):
    out, _ = quick
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    for name, summary in results["summary"]["conditions"].items():
        (run,) = runs[name]  # one seed in the quick test
        step = 0 if name == "base" else 2
        records = _records(pathlib.Path(run["workdir"]) / "eval" / f"step_{step}_harness.jsonl")
        student = [np.mean(r["rewards"]) for r in records]
        harness = [r["harness_reward"] or 0.0 for r in records]
        assert all(r["harness_mode"] for r in records)  # the harness really ran on every example
        assert summary["student"]["mean"] == pytest.approx(np.mean(student), abs=1e-12)
        assert summary["harness"]["mean"] == pytest.approx(np.mean(harness), abs=1e-12)
        lo, hi = summary["student"]["ci95"]
        assert min(student) <= lo <= summary["student"]["mean"] <= hi <= max(student)
    claim = results["summary"]["claims"]["3_ophsd_harness_minus_ophsd_student"]
    records = _records(pathlib.Path(runs["ophsd"][0]["workdir"]) / "eval" / "step_2_harness.jsonl")
    diffs = [(r["harness_reward"] or 0.0) - np.mean(r["rewards"]) for r in records]
    assert claim["mean"] == pytest.approx(np.mean(diffs), abs=1e-12)


COMMITTED = sorted(p for p in (ROOT / "docs" / "results").rglob("*.json") if "summary" in json.loads(p.read_text()))


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(ROOT / "docs" / "results")))
def test_committed_results_match_their_per_example_records(path):
    """docs/results' numbers are the report's from the records each file carries (not edited
    by hand, not left stale when a run is added): the means against a naive average, and the
    whole summary recomputed (the bootstrap is seeded; float64 sums of <= 2,000 numbers in
    [0, 1] agree to ~1e-13 across CPUs)."""
    from ophsd_jax.experiments import replicate as R

    results = json.loads(path.read_text())
    runs, summary = results["runs"], results["summary"]
    assert set(summary["conditions"]) == set(runs)
    for name, rs in runs.items():
        ids = sorted(rs[0]["examples"])
        for which, key in ((0, "student"), (1, "harness")):
            naive = np.mean([np.mean([r["examples"][i][which] or 0.0 for r in rs]) for i in ids])
            assert summary["conditions"][name][key]["mean"] == pytest.approx(naive, abs=1e-12), (name, key)

    def compare(a, b, where):
        if isinstance(a, dict):
            assert set(a) == set(b), where
            for k in a:
                compare(a[k], b[k], f"{where}/{k}")
        elif isinstance(a, list):
            assert len(a) == len(b), where
            for x, y in zip(a, b):
                compare(x, y, where)
        else:
            assert a == pytest.approx(b, abs=1e-12), where

    compare(R.summarize(runs), summary, "summary")


def test_committed_results_are_found():
    # the parametrized test above must not silently run on nothing
    assert {"arithmetic_small", "uspto", "uspto_gpu", "step1"} <= {p.parent.name for p in COMMITTED}


def test_a_second_invocation_skips_finished_runs(quick):
    out, _ = quick
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/eval/*_harness.jsonl")}
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("finished, skipped") == 5
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/eval/*_harness.jsonl")} == before


def test_split_seed_pins_the_held_out_set_across_seeds(tmp_path):
    """data.split_seed: runs of different seeds are evaluated on one held-out set; left at
    -1 the split follows `seed` (as before the key existed)."""
    from ophsd_jax import runtime

    def held_out(seed, split_seed):
        c = _tiny_config()
        c.seed, c.data.split_seed = seed, split_seed
        ev = runtime.load_data(c, str(tmp_path / f"{seed}_{split_seed}")).eval
        return [json.dumps(ev[i], sort_keys=True, default=str) for i in range(len(ev))]

    assert held_out(0, 0) == held_out(1, 0)
    assert held_out(0, -1) == held_out(0, 0) and held_out(1, -1) != held_out(1, 0)


def test_summary_statistics_against_a_naive_computation():
    """Condition means average each example over its k samples, then over seeds; claims are
    paired per-example differences; the intervals are bootstrap percentiles of the mean."""
    from ophsd_jax.experiments import replicate as R

    rng = np.random.default_rng(0)
    ids = [f"ex{i}" for i in range(30)]

    def run(p_student, p_harness):
        recs = [{"id": i, "rewards": rng.binomial(1, p_student, 4).astype(float).tolist(),
                 "harness_reward": float(rng.binomial(1, p_harness)) if j % 7 else None}  # None: no answer
                for j, i in enumerate(ids)]
        recs.append({"id": "long", "rewards": [], "unscored": "prompt_too_long", "harness_reward": None})
        return {"workdir": f"w{p_student}", "examples": {k: list(v) for k, v in R.per_example(recs).items()},
                "records": recs}

    runs = {"base": [run(0.2, 0.5)], "opsd": [run(0.3, 0.4), run(0.4, 0.4)], "ophsd": [run(0.6, 0.5), run(0.5, 0.6)]}
    out = R.summarize({k: [{kk: vv for kk, vv in r.items() if kk != "records"} for r in v] for k, v in runs.items()})
    assert out["examples"] == 30  # the unscored example is left out

    def naive(cond, harness):
        per_seed = [[np.mean(r["rewards"]) if not harness else (r["harness_reward"] or 0.0)
                     for r in run["records"] if r["rewards"]] for run in runs[cond]]
        return np.mean(per_seed, axis=0)

    for cond in runs:
        for which, harness in (("student", False), ("harness", True)):
            got, want = out["conditions"][cond][which], naive(cond, harness)
            assert got["mean"] == pytest.approx(want.mean(), abs=1e-12) and got["n"] == 30
            sd = want.std(ddof=1) / np.sqrt(len(want))  # the bootstrap interval ~ mean -/+ 1.96 sd
            assert got["ci95"][0] == pytest.approx(want.mean() - 1.96 * sd, abs=0.6 * sd + 1e-9)
            assert got["ci95"][1] == pytest.approx(want.mean() + 1.96 * sd, abs=0.6 * sd + 1e-9)
    claims = out["claims"]
    assert claims["1_ophsd_minus_opsd_student"]["mean"] == pytest.approx(
        (naive("ophsd", False) - naive("opsd", False)).mean(), abs=1e-12)
    assert claims["2_ophsd_student_minus_base_harness"]["mean"] == pytest.approx(
        (naive("ophsd", False) - naive("base", True)).mean(), abs=1e-12)
    assert claims["3_ophsd_harness_minus_ophsd_student"]["mean"] == pytest.approx(
        (naive("ophsd", True) - naive("ophsd", False)).mean(), abs=1e-12)


USPTO_CONFIG = '''
import sys
sys.path.insert(0, {configs!r})
from tiny import get_config as tiny


def get_config():
    c = tiny()
    c.task = "uspto"
    c.data.train = {{"kind": "uspto_csv", "path": {csv!r}}}
    c.data.validation_size = 8
    c.harness.name = "draft_verify"
    c.harness.options = {{"cold_start_threshold": 2, "draft_k": 2, "confirm_k": 2, "challenge_k": 2,
                         "draft_max_tokens": 8, "verify_max_tokens": 8, "embedder": "tfidf"}}
    return c
'''


def test_an_opsd_run_is_evaluated_with_draft_verify_reattached(tmp_path):
    """OPSD trains under its own harness (no state); its final evaluation re-attaches the
    task's Draft–Verify, whose training-harness state the OPSD checkpoint does not hold.
    (This failed with KeyError: 'bank' on the USPTO experiment.)"""
    csv = ROOT.parent / "shared" / "data" / "uspto" / "schneider_dataSetA.csv"
    if not csv.exists():
        pytest.skip(f"{csv} not found")
    config = tmp_path / "tiny_uspto.py"
    config.write_text(USPTO_CONFIG.format(configs=str(ROOT / "configs"), csv=str(csv)))
    out = tmp_path / "out"
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "ophsd_jax.experiments.replicate", "--config", str(config),
                           "--out", str(out), "--quick", "--seeds", "0", "--conditions", "opsd"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = _records(out / "opsd_seed0" / "eval" / "step_2_harness.jsonl")
    assert len(records) == 4 and all(r["harness_mode"] for r in records)
    assert "trained with harness 'opsd': its state is not loaded into 'draft_verify'" in proc.stderr


def test_a_stop_during_the_last_steps_evaluation_does_not_start_the_final_one(tmp_path, monkeypatch):
    """SIGTERM while the last step's evaluation runs: training returns having reached the
    last step, but the stop was asked for; the run must stop (checkpoint saved, resumed by
    the next invocation), not start the final evaluation with the harness."""
    from ophsd_jax import train
    from ophsd_jax.experiments import replicate as R
    from ophsd_jax.run import Run

    evaluated = []

    def stopped_at_the_end(c, workdir):
        Run._stop_requested = True  # what the SIGTERM handler sets
        return {"steps": c.train.steps}

    monkeypatch.setattr(Run, "_stop_requested", False)
    monkeypatch.setattr(train, "train", stopped_at_the_end)
    monkeypatch.setattr(train, "evaluate_workdir", lambda workdir, config: evaluated.append(workdir))
    with pytest.raises(R.Stopped, match="run the same command again"):
        R.run_condition(_tiny_config(), "ophsd", 0, str(tmp_path), quick=True)
    assert evaluated == []
    assert not os.path.exists(R.final_eval_path(R.run_dir(str(tmp_path), "ophsd", 0), 2))


def test_a_stop_ends_the_command_with_how_to_resume_not_an_error(tmp_path, monkeypatch, capsys):
    """The command stopped by SIGTERM (a preemption): it exits with the line that says how to
    resume, not as an error (no "error: Stopped" and no traceback file in out/errors/)."""
    from ophsd_jax import train
    from ophsd_jax.experiments import replicate as R
    from ophsd_jax.run import Run

    def stopped_at_step_1(c, workdir):
        Run._stop_requested = True  # what the SIGTERM handler sets
        return {"steps": 1}

    monkeypatch.setattr(Run, "_stop_requested", False)
    monkeypatch.setattr(train, "train", stopped_at_step_1)
    with pytest.raises(SystemExit, match="stopped at step 1 of 2; run the same command again to resume"):
        R.replicate_cli(_tiny_config(), str(tmp_path), conditions=["ophsd"], seeds=[0], quick=True)
    assert "error" not in capsys.readouterr().err
    assert not (tmp_path / "errors").exists()


def test_a_stop_during_the_final_evaluation_stops_it(tmp_path, monkeypatch):
    """SIGTERM during the final evaluation (harness re-attached): the evaluation's sampler
    polls the stop between decode segments, so the run stops without marking itself
    finished. (Its sampler had no poll: the final evaluation ran on to the end.)"""
    from ophsd_jax.experiments import replicate as R
    from ophsd_jax.run import Run

    monkeypatch.setattr(Run, "_stop_requested", True)  # what the SIGTERM handler sets
    with pytest.raises(R.Stopped, match="stopped during the final evaluation"):
        R.run_condition(_tiny_config(), "base", 0, str(tmp_path), quick=True)
    workdir = R.run_dir(str(tmp_path), "base", 0)
    assert not os.path.exists(R.final_eval_path(workdir, 0))
    assert not os.path.exists(os.path.join(workdir, "eval", "step_0.jsonl"))


def test_runs_of_an_earlier_report_join_with_include(tmp_path, monkeypatch):
    """--include: a run whose work dir is not here comes from an earlier results.json (and is
    not run again); a run finished here wins over the earlier report's; the report names
    which runs came from where; a report made with other settings is refused."""
    from ophsd_jax.experiments import replicate as R

    base = _tiny_config()
    ids = [f"ex{i}" for i in range(6)]

    def record(workdir, student):
        return {"workdir": workdir, "examples": {i: [student, 1.0] for i in ids}, "curve": [[0, 0.1], [2, student]],
                "loss": [[1, 0.5]], "wall_seconds": 10.0}

    earlier = {"command": "x", "quick": True, "seeds": [0, 1], "k": R.QUICK["eval.k"],
               "runs": {"base": [{**record("elsewhere/base", 0.25), "hardware": "one H200"}],
                        "ophsd": [record("elsewhere/ophsd_seed0", 0.5), record("elsewhere/ophsd_seed1", 0.0)]}}
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(earlier))
    out = tmp_path / "out"
    here = R.final_eval_path(R.run_dir(str(out), "ophsd", 1), R.QUICK["train.steps"])  # seed 1 finished here
    os.makedirs(os.path.dirname(here))
    with open(here, "w") as f:
        for i in ids:
            f.write(json.dumps({"id": i, "rewards": [1.0, 0.0], "harness_reward": 0.0}) + "\n")
    ran = []
    monkeypatch.setattr(R, "run_condition", lambda base, name, seed, out, quick: ran.append((name, seed)))
    results = R.replicate(base, str(out), conditions=["base", "ophsd"], seeds=[0, 1], quick=True,
                          include=[str(path)])
    assert ran == []  # base and ophsd seed 0 come from the earlier report; seed 1 is in both
    assert [r["workdir"] for r in results["runs"]["base"]] == ["elsewhere/base"]
    assert [r["workdir"] for r in results["runs"]["ophsd"]] == ["elsewhere/ophsd_seed0", R.run_dir(str(out), "ophsd", 1)]
    ophsd = results["summary"]["conditions"]["ophsd"]
    assert ophsd["per_seed_student"] == [0.5, 0.5] and ophsd["harness"]["mean"] == 0.5
    assert results["summary"]["claims"]["2_ophsd_student_minus_base_harness"]["mean"] == pytest.approx(-0.5)
    table = (out / "results.md").read_text()
    assert f"base ({path}; one H200), ophsd_seed0 ({path})." in table and "ophsd_seed1 (" not in table

    monkeypatch.setattr(R, "run_condition", lambda base, name, seed, out, quick: ran.append((name, seed)))
    R.replicate(base, str(out), conditions=["ophsd"], seeds=[0, 1, 2], quick=True, include=[str(path)])
    assert ran == [("ophsd", 2)]  # in neither: run

    path.write_text(json.dumps({**earlier, "k": earlier["k"] + 1}))
    with pytest.raises(ValueError, match=f"--include {path}: its runs were made with quick=True, k="):
        R.replicate(base, str(out), conditions=["ophsd"], seeds=[0], quick=True, report_only=True,
                    include=[str(path)])
