"""The training CLI end to end on configs/tiny.py: metrics, checkpoints, evaluate,
export (loaded by transformers), resume after SIGKILL (bitwise), SIGTERM during a long
rollout or evaluation (abandoned at once; the resumed run is bitwise the uninterrupted
one), a truncated checkpoint, an incompatible one (an error, the work dir untouched), a
resume on another device count, and one-line errors."""

import atexit
import glob
import hashlib
import json
import math
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

import tolerances as tol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
STOP_DRIVER = os.path.join(ROOT, "tests", "stop_driver.py")
# One XLA compilation cache for the test session's training runs: each run would otherwise
# spend about half its time compiling the same programs again. (`finished_run` keeps the
# default cache in its work dir, which one test checks, and copies it here.)
SHARED_CACHE = tempfile.mkdtemp(prefix="ophsd_test_xla_cache_")
atexit.register(shutil.rmtree, SHARED_CACHE, ignore_errors=True)
METRIC_KEYS = ("loss", "grad_norm", "student_entropy", "tokens", "skipped_updates", "rollout/reward",
               "lr", "tokens_per_s", "time/generate_s", "time/update_s",
               "time/generate_share", "batch/skipped", "harness/mode_plan_solve")


def env(devices=1):
    e = dict(os.environ)
    e.pop("XLA_FLAGS", None)  # one CPU device, like a user's laptop
    if devices > 1:
        e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    e["PYTHONPATH"] = ROOT
    return e


def cli(module, *args, check=True, **kw):
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=600, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def train_args(workdir, *extra, shared_cache=True):
    cache = (f"--config.train.compilation_cache_dir={SHARED_CACHE}",) if shared_cache else ()
    return ("--config", TINY, "--workdir", str(workdir), *cache, *extra)


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_params(workdir, step):
    """Params of checkpoint `step`, via the public export path (safetensors)."""
    from safetensors.numpy import load_file

    out = os.path.join(workdir, f"export_{step}")
    if not os.path.exists(os.path.join(out, "model.safetensors")):  # (the shared reference run: once)
        cli("ophsd_jax.export", "--workdir", str(workdir), "--step", str(step), "--out", out)
    return load_file(os.path.join(out, "model.safetensors"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny")
    proc = cli("ophsd_jax.train", *train_args(workdir, "--config.train.save_every=1", shared_cache=False))
    shutil.copytree(workdir / "xla_cache", SHARED_CACHE, dirs_exist_ok=True)  # the other runs start warm
    return workdir, proc


def test_compiled_programs_are_cached_in_the_workdir(finished_run):
    workdir, _ = finished_run
    cached = glob.glob(os.path.join(workdir, "xla_cache", "*"))
    assert len(cached) >= 2, cached  # at least the sampler and the train step (each compiles for > 1 s)


def test_metrics_checkpoints_and_summary(finished_run):
    workdir, proc = finished_run
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        missing = [k for k in METRIC_KEYS if k not in r]
        assert not missing, missing
        for k in METRIC_KEYS:
            assert isinstance(r[k], float) and math.isfinite(r[k]), (k, r[k])
    assert rows[0]["tokens"] > 0 and rows[-1]["lr"] == pytest.approx(1e-3)
    # harness/reward: on the steps that solved a row (0.125 of 2 rows: one row in 4 steps)
    assert [r["step"] for r in rows if "harness/reward" in r] == [4]
    assert all(math.isfinite(r["harness/reward"]) for r in rows if "harness/reward" in r)
    assert any("eval/avg@2" in r for r in rows)
    steps = sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints", "[0-9]*")))
    assert steps == [2, 3, 4]  # keep_checkpoints=3 of 1..4
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.*"))
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert "before/eval/avg@2" in summary and "after/eval/harness_acc" in summary
    assert "harness_acc" in proc.stdout  # the before/after table


def test_evaluate_cli_writes_per_example_records(finished_run):
    workdir, _ = finished_run
    proc = cli("ophsd_jax.evaluate", "--workdir", str(workdir), "--step", "3", "--num_examples", "3")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["eval/examples"] == 3 and "eval/pass@2" in summary
    records = [json.loads(l) for l in open(os.path.join(workdir, "eval", "step_3.jsonl"))]
    assert len(records) == 3
    for r in records:
        assert {"prompt", "responses", "extracted", "rewards", "harness_response"} <= set(r)
        assert len(r["responses"]) == 2


def test_a_checkpoint_evaluates_on_another_held_out_set_and_seed(finished_run, tmp_path):
    """`evaluate --config` on a trained work dir: its checkpoint, with the config's own
    held-out set, seed and training data (someone else's evaluation). The data iterator's
    state in the checkpoint is the training run's; it must not get in the way."""
    workdir, _ = finished_run
    wd = tmp_path / "wd"
    shutil.copytree(workdir / "checkpoints", wd / "checkpoints")  # (leave the shared run's eval/ alone)
    proc = cli("ophsd_jax.evaluate", "--config", TINY, "--workdir", str(wd), "--config.seed=5",
               "--config.data.train.seed=3", "--config.data.eval.kind=reasoning_gym", "--config.data.eval.size=3",
               "--config.data.eval.seed=11", "--config.data.eval.families=(\"chain_sum\",)",
               "--config.eval.num_examples=0", f"--config.train.compilation_cache_dir={SHARED_CACHE}")
    assert f"resumed from {wd}/checkpoints/4" in proc.stderr  # the trained weights, not the initial ones
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["eval/examples"] == 3  # all of the given set (tiny's own held-out part has 8)
    records = [json.loads(l) for l in open(wd / "eval" / "step_4.jsonl")]
    assert len(records) == 3 and all(len(r["responses"]) == 2 for r in records)


def test_export_loads_in_transformers_with_matching_logits(finished_run):
    import jax.numpy as jnp
    import torch
    import transformers

    from ophsd_jax import parallel
    from ophsd_jax.models import state as S
    from ophsd_jax.models.weights import load_hf

    workdir, _ = finished_run
    out = os.path.join(workdir, "hf")
    cli("ophsd_jax.export", "--workdir", str(workdir), "--out", out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "2+3?"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids])).logits.numpy()
    cfg, graphdef, params = load_hf(out, parallel.single_device_mesh())
    t = jnp.asarray([ids]); m = jnp.ones_like(t)
    h, _ = S.forward(graphdef, params, t, S.positions_from_mask(m), m)
    np.testing.assert_allclose(np.asarray(S.logits(graphdef, params, h)), ref, rtol=0,
                               atol=tol.logits_atol(cfg, graphdef, params, t.shape[1]))
    # the export holds the trained weights, not the initial ones
    init = final_params(workdir, 2)
    trained = final_params(workdir, 4)
    assert any(not np.array_equal(init[k], trained[k]) for k in trained)


def wait_for(predicate, proc, timeout=300):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.2)


def complete_steps(workdir):
    return sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints", "[0-9]*"))
                  if os.path.basename(p).isdigit())


def test_sigkill_then_resume_is_bitwise_identical(finished_run, tmp_path):
    ref_dir, _ = finished_run
    workdir = tmp_path / "killed"
    args = [sys.executable, "-m", "ophsd_jax.train", *train_args(workdir, "--config.train.save_every=1")]
    proc = subprocess.Popen(args, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: complete_steps(workdir) and complete_steps(workdir)[-1] >= 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    k = complete_steps(workdir)[-1]
    assert k < 4, "the run finished before it could be killed"
    resumed = cli("ophsd_jax.train", *train_args(workdir, "--config.train.save_every=1"))
    assert f"resumed from {workdir}/checkpoints/{k}" in resumed.stderr
    assert [r["step"] for r in read_metrics(workdir)][-(4 - k):] == list(range(k + 1, 5))
    a, b = final_params(ref_dir, 4), final_params(workdir, 4)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# A stop must fit a TPU preemption notice (~30 s): abandoning the step leaves only the save
# of the last completed step (a few MB here) and the process exit. The slow phase of the
# driver would otherwise run for hours, so a stop that waited for the step never comes.
STOP_SECONDS = 20


def timing_free(rows):
    """Metrics rows by step without wall-clock values (the only ones a resume may change)."""
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith("time/")
                      and k not in ("tokens_per_s", "eval/seconds", "eval/tokens_per_s")}
            for r in rows}


@pytest.mark.parametrize("phase,step", [("rollout", 3), ("eval", 2), ("eval", 4)])
def test_sigterm_abandons_the_step_then_resume_is_bitwise_identical(finished_run, tmp_path, phase, step):
    """SIGTERM while the rollout of step 3 (or the evaluation after step 2, or the final one
    after step 4) runs: the run exits 0 within seconds with a checkpoint of the last
    completed step; run again, it ends with the params and metrics of the uninterrupted run."""
    ref_dir, _ = finished_run
    workdir, marker = tmp_path / "term", tmp_path / "in_slow_phase"
    args = train_args(workdir, "--config.train.save_every=100")  # no checkpoint but the stop's
    e = {**env(), "OPHSD_TEST_SLOW": f"{phase}:{step}", "OPHSD_TEST_MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, STOP_DRIVER, *args], cwd=ROOT, env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(marker.exists, proc)
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"no exit within 120 s of SIGTERM (in the {phase} phase)")
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, err[-3000:]
    assert seconds < STOP_SECONDS, f"{seconds:.1f} s from SIGTERM to exit"
    done = step - 1 if phase == "rollout" else step  # the last completed step
    assert complete_steps(workdir) == [done]
    # An abandoned evaluation's row waits for the resumed run.
    assert [r["step"] for r in read_metrics(workdir)] == list(range(1, done + (phase == "rollout")))
    assert f"stopped after step {done}" in err

    resumed = cli("ophsd_jax.train", *args)
    assert f"resumed from {workdir}/checkpoints/{done}" in resumed.stderr
    rows, ref_rows = read_metrics(workdir), read_metrics(ref_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert timing_free(rows) == timing_free(ref_rows)
    assert any("eval/avg@2" in r for r in rows if r["step"] == done)
    a, b = final_params(ref_dir, 4), final_params(workdir, 4)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_evaluations_run_without_the_optimizer_state_and_teacher(tmp_path, monkeypatch):
    """Step 0's evaluation (a fresh run) and the last one (after the final checkpoint) free
    the optimizer's moments and the frozen teacher. Step 0 rebuilds them exactly (the run
    trains as one that skips that evaluation) and the last checkpoint still holds them.
    An evaluation-only run never builds them."""
    import importlib.util

    import jax

    from ophsd_jax import run as run_mod
    from ophsd_jax.train import train

    spec = importlib.util.spec_from_file_location("tiny", TINY)
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    seen = []
    evaluate = run_mod.Run.evaluate

    def spy(self, step):
        seen.append((step, self.state.opt_state is None, self.teacher_params is None))
        return evaluate(self, step)

    monkeypatch.setattr(run_mod.Run, "evaluate", spy)

    def run(name, eval_before):
        c = tiny.get_config()
        c.train.eval_before, c.train.compilation_cache_dir = eval_before, SHARED_CACHE
        c.train.batch_size = 8  # in-process: the tests' 8 CPU devices shard the batch
        c.train.steps, c.train.eval_every = 2, 1
        train(c, str(tmp_path / name))
        return c

    c = run("lean", True)
    assert seen == [(0, True, True), (1, False, False), (2, True, True)]
    run("reference", False)
    assert timing_free(read_metrics(tmp_path / "lean")) == timing_free(read_metrics(tmp_path / "reference"))
    resumed = [run_mod.Run.create(c, str(tmp_path / name)) for name in ("lean", "reference")]
    try:
        assert [r.step for r in resumed] == [2, 2]
        for a, b in zip(*(jax.tree.leaves(r.state) for r in resumed), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert any(np.any(np.asarray(m)) for m in jax.tree.leaves(resumed[0].state.opt_state))
    finally:
        for r in resumed:
            r.ckpt.close()
    # An evaluation-only run builds no moments or teacher at all, not even to restore into.
    built = []
    init = run_mod.init_train_state

    def init_spy(params, *args):
        built.append(all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)))
        return init(params, *args)

    monkeypatch.setattr(run_mod, "init_train_state", init_spy)
    evaluating = run_mod.Run.create(c, str(tmp_path / "lean"), for_eval=True)
    try:
        assert built == [True] and evaluating.step == 2  # only the abstract restore target
        assert evaluating.state.opt_state is None and evaluating.teacher_params is None
        for a, b in zip(jax.tree.leaves(evaluating.state.params), jax.tree.leaves(resumed[0].state.params),
                        strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    finally:
        evaluating.ckpt.close()


def workdir_state(workdir):
    """Every path under `workdir` with its mtime, size and content hash."""
    out = {}
    for root, dirs, files in os.walk(workdir):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.stat(path)
            digest = hashlib.sha256(open(path, "rb").read()).hexdigest() if os.path.isfile(path) else None
            out[os.path.relpath(path, workdir)] = (st.st_mtime_ns, st.st_size, digest)
    return out


@pytest.mark.parametrize("override,expected", [
    ("--config.model.random.intermediate_size=96", "model intermediate_size=128 in the checkpoint, 96 in this run"),
    ("--config.model.param_dtype=bfloat16", "model param_dtype='float32' in the checkpoint, 'bfloat16' in this run"),
    ("--config.model.random.rope_theta=500000.0", "model rope_theta=10000.0 in the checkpoint, 500000.0 in this run"),
], ids=["shape", "dtype", "model"])
def test_incompatible_checkpoint_is_one_line_and_touches_nothing(finished_run, tmp_path, override, expected):
    import shutil

    workdir = tmp_path / "changed"
    shutil.copytree(finished_run[0], workdir)
    before = workdir_state(workdir)
    proc = cli("ophsd_jax.train", *train_args(workdir, "--config.train.steps=6", override), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    prefix = (f"error: IncompatibleCheckpoint: checkpoint {workdir}/checkpoints/4 does not fit this config: "
              f"{expected} (resume with the config it was saved with, or use another work dir) "
              f"(traceback in {workdir}/errors/")
    assert len(errors) == 1 and errors[0].startswith(prefix) and errors[0].endswith(".txt)"), proc.stderr[-3000:]
    assert "is unreadable" not in proc.stderr  # not mistaken for a corrupt one
    # Nothing of the run is touched; the only addition is the error's traceback file.
    after = workdir_state(workdir)
    added = sorted(set(after) - set(before))
    assert {k: after[k] for k in before} == before
    assert added[0] == "errors" and len(added) == 2 and errors[0].endswith(f"{workdir}/{added[1]})")


def test_resume_on_another_device_count(finished_run, tmp_path):
    """Saved on 1 device, resumed on 8 (fsdp=2 x tensor=4: the batch of 2 rows needs at most
    2 batch shards): continues from the checkpoint. (Bitwise equality of the restored state
    across meshes, 1 <-> 8 devices: tests/test_checkpoint_restore.py.)"""
    import shutil

    workdir = tmp_path / "wider"
    shutil.copytree(finished_run[0], workdir)
    args = train_args(workdir, "--config.train.steps=5", "--config.mesh.fsdp=2", "--config.mesh.tensor=4")
    proc = subprocess.run([sys.executable, "-m", "ophsd_jax.train", *args], cwd=ROOT, env=env(devices=8),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {workdir}/checkpoints/4" in proc.stderr
    assert "on mesh {'data': 1, 'fsdp': 2, 'tensor': 4}" in proc.stderr
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3, 4, 5]


def test_truncated_newest_checkpoint_falls_back(finished_run, tmp_path):
    import shutil

    workdir = tmp_path / "trunc"
    shutil.copytree(finished_run[0], workdir)
    for path in glob.glob(os.path.join(workdir, "checkpoints", "4", "state", "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "r+b") as f:
                f.truncate(max(os.path.getsize(path) // 2, 1))
    proc = cli("ophsd_jax.evaluate", "--workdir", str(workdir), "--num_examples", "1")
    assert "checkpoints/4 is unreadable" in proc.stderr
    assert f"resumed from {workdir}/checkpoints/3" in proc.stderr


def write_config(tmp_path, body):
    path = tmp_path / f"bad_config_{abs(hash(body))}.py"
    path.write_text(f"import sys\nsys.path.insert(0, {os.path.join(ROOT, 'configs')!r})\n"
                    f"from tiny import get_config as tiny\n\ndef get_config():\n    c = tiny()\n{body}\n    return c\n")
    return str(path)


@pytest.mark.parametrize("case", ["unknown_key", "unknown_section", "typo_in_config_file", "missing_config_file",
                                  "eval_set_override", "missing_model", "unreadable_data", "empty_dataset",
                                  "bad_value"])
def test_errors_are_one_line_and_keep_the_workdir(case, tmp_path):
    workdir = tmp_path / "work"
    (workdir / "checkpoints").mkdir(parents=True)
    keep = workdir / "precious.txt"
    keep.write_text("earlier results")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = {
        "unknown_key": ("--config", TINY, "--config.train.no_such_key=1"),
        "unknown_section": ("--config", TINY, "--config.trian.steps=1"),
        "typo_in_config_file": ("--config", write_config(tmp_path, "    c.train.stepz = 3")),
        "missing_config_file": ("--config", str(tmp_path / "no_such_config.py")),
        # keys new to an open section are accepted and reach their user (here the eval loader)
        "eval_set_override": ("--config", TINY, "--config.data.eval.kind=gsm8k_jsonl",
                              "--config.data.eval.path=/no/such/eval.jsonl"),
        "missing_model": ("--config", TINY, "--config.model.source=hf", "--config.model.path=/no/such/model"),
        "unreadable_data": ("--config", write_config(tmp_path, "    c.data.train = {'kind': 'gsm8k_jsonl', "
                                                               "'path': '/no/such/train.jsonl'}")),
        "empty_dataset": ("--config", write_config(tmp_path, f"    c.data.train = {{'kind': 'gsm8k_jsonl', "
                                                             f"'path': {str(empty)!r}}}")),
        "bad_value": ("--config", TINY, "--config.distill.kind=kl"),
    }[case]
    proc = cli("ophsd_jax.train", *args, "--workdir", str(workdir), check=False)
    assert proc.returncode != 0
    expected = {"unknown_key": "config.train.no_such_key: unknown key", "unknown_section": "'trian'",
                "typo_in_config_file": "did you mean train.steps", "missing_config_file": "no_such_config.py",
                "eval_set_override": "/no/such/eval.jsonl", "missing_model": "/no/such/model",
                "unreadable_data": "/no/such/train.jsonl", "empty_dataset": "empty",
                "bad_value": "config.distill.kind"}[case]
    error_lines = [l for l in proc.stderr.splitlines() if expected in l]
    assert error_lines, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert keep.read_text() == "earlier results" and (workdir / "checkpoints").is_dir()
