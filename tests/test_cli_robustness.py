"""The training CLI does not lose a run to one over-long prompt, and its errors keep their
traceback in the work dir (configs/tiny.py, real subprocesses)."""

import json
import os
import subprocess
import sys

import pytest

from test_trainer import cli, read_metrics, train_args


@pytest.mark.parametrize("limit", [128, 64])
def test_prompts_longer_than_the_sampler_takes_are_skipped_and_counted(tmp_path, limit):
    """sampler.prompt_buckets=(limit,). The tiny run's student prompts are 65-95 tokens
    and its training planner prompts (reference solution included) over 180: with 128
    every example is skipped at the plan call, with 64 already at the rollout; evaluation
    scores what fits and counts the rest."""
    workdir = tmp_path / "long"
    cli("ophsd_jax.train", *train_args(workdir, f"--config.sampler.prompt_buckets=({limit},)",
                                       "--config.train.steps=2", "--config.train.eval_every=2"))
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == [1, 2]
    phase = "harness" if limit == 128 else "rollout"
    for r in rows:  # batch_size=2: both examples of every step skipped, so no update
        assert r[f"batch/skipped_{phase}_prompt_too_long"] == r["batch/skipped"] == 2
        assert r["harness/mode_skipped_plan"] == 2 and r["batch/valid"] == 0 and "loss" not in r
        assert (r["rollout/response_tokens"] > 0) if phase == "harness" else r["rollout/response_tokens"] == "nan"
    for step in (0, 2):
        summary = json.load(open(os.path.join(workdir, "eval", f"step_{step}_summary.json")))
        records = [json.loads(line) for line in open(os.path.join(workdir, "eval", f"step_{step}.jsonl"))]
        assert summary["eval/examples"] == len(records) == 2
        assert summary["eval/unscored"] == (0 if phase == "harness" else 2)
        assert summary["eval/unscored"] == sum(r.get("unscored") == "prompt_too_long" for r in records)
        unscored = [r for r in records if r["harness_mode"].startswith("skipped_")]
        assert summary["eval/harness_unscored"] == len(unscored) >= 1
        assert all(r["harness_reward"] is None for r in unscored)


def error_line(stderr):
    lines = [l for l in stderr.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def traceback_file(line):
    """The file named by the error line, which must exist."""
    path = line.rsplit("(traceback in ", 1)[1].rstrip(")")
    assert os.path.isfile(path), line
    return path, open(path).read()


def test_a_user_error_is_one_line_and_its_traceback_is_in_the_workdir(tmp_path):
    workdir = tmp_path / "work"
    proc = cli("ophsd_jax.train", *train_args(workdir, "--config.distill.kind=kl"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = error_line(proc.stderr)
    assert line.startswith("error: ConfigValueError: config.distill.kind: must be one of")
    path, text = traceback_file(line)
    assert os.path.dirname(path) == str(workdir / "errors")
    assert "Traceback (most recent call last)" in text and "in validate" in text and "config.distill.kind" in text


def buggy_train(tmp_path, exc):
    """`python -m ophsd_jax.train` in which loading the data raises `exc` (a stand-in for a
    bug deep in the run, or an error from JAX)."""
    script = tmp_path / "buggy_train.py"
    script.write_text("import runpy\nfrom ophsd_jax import runtime\n\n"
                      f"def load_data(c, workdir):\n    raise {exc}\n\n"
                      "runtime.load_data = load_data\n"
                      "runpy.run_module('ophsd_jax.train', run_name='__main__', alter_sys=True)\n")
    return str(script)


@pytest.mark.parametrize("exc", ["KeyError('no_such_field')", "RuntimeError('INTERNAL: XLA failed')"])
def test_errors_from_bugs_keep_their_traceback(tmp_path, exc):
    """A KeyError (a type also used for user errors) stays one console line, a RuntimeError
    shows its traceback; both write the whole traceback, with the raising frame, to a file."""
    from test_trainer import ROOT, TINY, env

    workdir = tmp_path / "work"
    proc = subprocess.run([sys.executable, buggy_train(tmp_path, exc), "--config", TINY, "--workdir", str(workdir)],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    line = error_line(proc.stderr)
    path, text = traceback_file(line)
    assert os.path.dirname(path) == str(workdir / "errors")
    assert "Traceback (most recent call last)" in text and "in load_data" in text and "in create" in text
    if exc.startswith("KeyError"):
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert line.startswith("error: KeyError: 'no_such_field' (traceback in ")
    else:
        assert proc.returncode == 1 and "RuntimeError: INTERNAL: XLA failed" in proc.stderr
        assert "Traceback (most recent call last)" in proc.stderr


def test_evaluate_on_a_missing_workdir_does_not_create_it(tmp_path):
    missing = tmp_path / "no_such_run"
    proc = cli("ophsd_jax.evaluate", "--workdir", str(missing), check=False)
    assert proc.returncode == 2 and not missing.exists()
    line = error_line(proc.stderr)
    assert str(missing) in line
    path, text = traceback_file(line)
    assert "FileNotFoundError" in text
    os.remove(path)  # in the system temp dir


def test_release_host_memory_returns_freed_heap_to_the_os():
    """Between phases the trainer hands freed heap back (`runtime.release_host_memory`):
    256 MiB of freed heap chunks below a live one (so the heap's top cannot shrink) stay
    resident until then. In a fresh process, so earlier tests' free lists do not interfere."""
    import textwrap

    code = textwrap.dedent("""
        import os
        from ophsd_jax.runtime import release_host_memory
        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        base = rss()
        blocks = [bytearray(64 << 10) for _ in range(4096)]  # under glibc's mmap threshold: heap
        pin = bytearray(64 << 10)
        del blocks
        held = rss()
        release_host_memory()
        print(held - base, rss() - base)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    held, after = map(int, out.stdout.split()[-2:])
    assert held > 200 << 20, held  # the freed chunks were still resident
    assert after < held // 4, (held, after)


def test_the_heap_is_released_after_each_compilation_not_after_each_call():
    """`runtime.release_host_memory_after_compiles`: the compiler's freed heap goes back to
    the OS when a compilation ends, before the program's first run. Counts the releases
    around a new program, its cached reruns, a second program and a second registration.
    Also fails if JAX stops recording the compile event the hook listens for."""
    import textwrap

    code = textwrap.dedent("""
        import jax, jax.numpy as jnp
        from ophsd_jax import runtime
        calls = []
        runtime.release_host_memory = lambda: calls.append(1)
        runtime.release_host_memory_after_compiles()
        runtime.release_host_memory_after_compiles()  # once per process
        x = jnp.ones(8)  # (may compile a program itself)
        start = len(calls)
        f = jax.jit(lambda a: jnp.sin(a) * 3.0)
        f(x).block_until_ready()
        first = len(calls) - start
        for _ in range(3):
            f(x).block_until_ready()
        reruns = len(calls) - start - first
        jax.jit(lambda a: jnp.cos(a) + 1.0)(x).block_until_ready()
        print(first, reruns, len(calls) - start - first - reruns)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    first, reruns, second = map(int, out.stdout.split()[-3:])
    assert (first, reruns, second) == (1, 0, 1), out.stdout
