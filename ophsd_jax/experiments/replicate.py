"""Reproduce the paper's three claims at small scale: every condition, shared data and seeds.

    python -m ophsd_jax.experiments.replicate --config configs/replicate_arithmetic.py --out runs/replicate
    python -m ophsd_jax.experiments.replicate ... --quick     # a minutes-long smoke run (the CI test)
    python -m ophsd_jax.experiments.replicate ... --report    # tables and plots from what has finished
    python -m ophsd_jax.experiments.replicate ... --include old/results.json  # with runs of an earlier report

Conditions (the same steps, batch, sampling budget and held-out set for all):

  base        the initial weights, no training: the student alone and with the harness
  opsd        the OPSD baseline: the teacher is the same model shown the reference
              solution (harness `opsd`), reverse KL, frozen initial teacher
  ophsd       OPHSD: the teacher sees the task's harness context, reverse KL, frozen teacher
  ophsd_live  OPHSD with the live teacher (distill.teacher=current)
  ophsd_jsd   OPHSD with JSD (distill.beta=0.5)

Every trained condition runs once per seed (`--seeds`, default 0,1), each in its own work
dir `<out>/<condition>_seed<s>`: an interrupted one resumes from its newest checkpoint when
the command is run again, and a finished one is skipped. The held-out split is the same for
every run (`data.split_seed` is pinned); the seed changes the training order, the sampling
and the evaluation draws. During training the student is evaluated alone every
`train.eval_every` steps; after training the final checkpoint is evaluated alone and with
the task's inference harness re-attached (Plan–Solve without the reference, Draft–Verify
with the training split as its bank), by `ophsd_jax.evaluate`, whose records stay in the
work dir. The harness is never shown a held-out answer and nothing is tuned on the
held-out set.

Writes `<out>/results.json` (per run: the final per-example records' rewards, the curves;
per condition and per claim: means with 95% bootstrap intervals over examples, all
recomputed from the records), `<out>/results.md` (the table) and PNG plots.
"""

from __future__ import annotations

import copy
import glob
import json
import logging
import os
import re
import shutil
import signal
import sys
import time

import numpy as np

log = logging.getLogger(__name__)

# name: (config overrides, trained?)
CONDITIONS = {
    "base": ({}, False),
    # (OPSD builds its teacher context without a model call: none of the harness's options apply)
    "opsd": ({"harness.name": "opsd", "harness.options": {}, "distill.kind": "reverse_kl",
              "distill.teacher": "initial"}, True),
    "ophsd": ({"distill.kind": "reverse_kl", "distill.teacher": "initial"}, True),
    "ophsd_live": ({"distill.kind": "reverse_kl", "distill.teacher": "current"}, True),
    "ophsd_jsd": ({"distill.kind": "jsd", "distill.beta": 0.5, "distill.teacher": "initial"}, True),
}
# --quick: every condition and code path, at the smallest sizes that still train and evaluate.
QUICK = {"train.steps": 2, "train.eval_every": 1, "train.save_every": 2, "eval.num_examples": 4, "eval.k": 2,
         "train.eval_before": True}
BOOTSTRAP_DRAWS = 2000


# ---------------------------------------------------------------------------------------
# Running the conditions.
# ---------------------------------------------------------------------------------------


def run_config(base, condition: str, seed: int, quick: bool):
    """The config of one run: the experiment's config, the condition's overrides, the seed."""
    c = copy.deepcopy(base)
    c.update_from_flattened_dict({**CONDITIONS[condition][0], **(QUICK if quick else {})})
    split = base.data.get("split_seed", -1)
    c.data.split_seed = split if split >= 0 else base.seed  # one held-out set for every seed
    c.seed = seed
    c.eval.harness = False  # during training: the student alone; the harness after training
    return c


def eval_config(run_c, base):
    """Evaluation of a run's final checkpoint: the run's settings, with the task's inference
    harness (the experiment config's, not OPSD's reference-reading teacher) re-attached."""
    c = copy.deepcopy(run_c)
    c.harness = copy.deepcopy(base.harness)
    c.eval.harness = True
    return c


def final_eval_path(workdir: str, step: int) -> str:
    return os.path.join(workdir, "eval", f"step_{step}_harness.jsonl")


def run_condition(base, condition: str, seed: int, out: str, quick: bool) -> str:
    """Train (or resume) one run, then evaluate its final weights alone and with the
    harness. Returns its work dir; a run whose final evaluation exists is skipped."""
    import jax

    from ophsd_jax import train
    from ophsd_jax.config import validate
    from ophsd_jax.run import Run, StopRequested

    c = run_config(base, condition, seed, quick)
    validate(c)
    workdir = run_dir(out, condition, seed)
    steps = final_step(c, condition)
    done = final_eval_path(workdir, steps)
    if os.path.exists(done):
        log.info("%s: finished, skipped", workdir)
        return workdir
    os.makedirs(workdir, exist_ok=True)
    t0, finished = time.perf_counter(), False
    try:
        if CONDITIONS[condition][1]:
            reached = train.train(c, workdir)["steps"]
            # Stopped (SIGTERM; also during the last step's evaluation, which reached it): the
            # checkpoint is saved; resume later, rather than go on to the final evaluation.
            if reached != steps or Run.stop_agreed():
                raise Stopped(f"{workdir}: stopped at step {reached} of {steps}; run the same command again "
                              "to resume")
        # The final checkpoint (or, untrained, the initial weights) with the harness re-attached.
        # This rewrites eval/step_<N>.jsonl; the copy under its own name marks the run finished.
        try:
            train.evaluate_workdir(workdir, config=eval_config(c, base))
        except StopRequested:  # SIGTERM during the final evaluation: nothing is lost but the evaluation
            raise Stopped(f"{workdir}: stopped during the final evaluation; run the same command again "
                          "to redo it") from None
        shutil.copyfile(os.path.join(workdir, "eval", f"step_{steps}.jsonl"), done + ".tmp")
        os.replace(done + ".tmp", done)
        finished = True
    finally:  # wall-clock of every session that worked on the run, finished or not
        with open(os.path.join(workdir, "wall_seconds.jsonl"), "a") as f:
            f.write(json.dumps({"seconds": round(time.perf_counter() - t0, 1), "finished": finished,
                                "at": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        jax.clear_caches()  # the next run compiles its own programs: do not keep this one's
    return workdir


class Stopped(Exception):
    pass


def run_dir(out: str, condition: str, seed: int) -> str:
    return os.path.join(out, f"{condition}_seed{seed}" if CONDITIONS[condition][1] else condition)


def final_step(c, condition: str) -> int:
    return c.train.steps if CONDITIONS[condition][1] else 0


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------
# Statistics (from the per-example records only).
# ---------------------------------------------------------------------------------------


def bootstrap_ci(values: np.ndarray, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> list[float]:
    """95% percentile interval of the mean, resampling examples (rows) with replacement."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return [float("nan"), float("nan")]
    idx = np.random.default_rng(seed).integers(0, len(values), (draws, len(values)))
    means = values[idx].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def stat(values) -> dict:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()) if v.size else float("nan"), "ci95": bootstrap_ci(v), "n": int(v.size)}


def per_example(records: list[dict]) -> dict:
    """{id: (student avg over its k samples, harness reward or None)} of scored examples."""
    out = {}
    for r in records:
        if r.get("unscored") or not r["rewards"]:
            continue
        out[str(r["id"])] = (float(np.mean(r["rewards"])), r.get("harness_reward"))
    return out


def read_run(workdir: str, steps: int) -> dict:
    records = _read_jsonl(final_eval_path(workdir, steps))
    curve = []
    for path in glob.glob(os.path.join(workdir, "eval", "step_*_summary.json")):
        m = re.fullmatch(r"step_(\d+)_summary\.json", os.path.basename(path))
        if m:
            with open(path) as f:
                s = json.load(f)
            key = next(k for k in s if k.startswith("eval/avg@"))
            curve.append([int(m.group(1)), s[key]])
    losses = []
    metrics = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics):
        for row in _read_jsonl(metrics):
            if "loss" in row:
                losses.append([row["step"], float(row["loss"])])  # ("nan" is written as a string)
    seconds = 0.0
    if os.path.exists(os.path.join(workdir, "wall_seconds.jsonl")):
        seconds = sum(r["seconds"] for r in _read_jsonl(os.path.join(workdir, "wall_seconds.jsonl")))
    examples = per_example(records)
    return {"workdir": workdir, "examples": {i: list(v) for i, v in examples.items()},
            "curve": sorted(curve), "loss": sorted(losses), "wall_seconds": seconds}


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Per condition: student and harness-reattached accuracy (examples averaged over the
    condition's seeds first), and the three claims as paired differences over examples."""
    ids = None
    for rs in runs.values():
        for r in rs:
            these = set(r["examples"])
            if ids is not None and these != ids:
                raise ValueError(f"{r['workdir']}: its held-out examples differ from the other runs'")
            ids = these
    ids = sorted(ids or [])

    def column(condition: str, which: int) -> np.ndarray:  # per example, averaged over seeds
        vals = [[r["examples"][i][which] for r in runs[condition]] for i in ids]
        return np.array([np.mean([x if x is not None else 0.0 for x in v]) for v in vals], np.float64)

    conditions = {}
    for name, rs in runs.items():
        conditions[name] = {"seeds": len(rs), "student": stat(column(name, 0)), "harness": stat(column(name, 1)),
                            "wall_seconds": [r.get("wall_seconds", 0.0) for r in rs],
                            "per_seed_student": [float(np.mean([r["examples"][i][0] for i in ids])) for r in rs]}
    claims = {}
    if "ophsd" in runs and "opsd" in runs:  # 1. OPHSD beats the OPSD baseline
        claims["1_ophsd_minus_opsd_student"] = stat(column("ophsd", 0) - column("opsd", 0))
    if "ophsd" in runs and "base" in runs:  # 2. the student alone >= base + harness
        claims["2_ophsd_student_minus_base_harness"] = stat(column("ophsd", 0) - column("base", 1))
    if "ophsd" in runs:  # 3. re-attaching the harness adds nothing
        claims["3_ophsd_harness_minus_ophsd_student"] = stat(column("ophsd", 1) - column("ophsd", 0))
    if "base" in runs:  # the premise: the harness helps the base model
        claims["0_base_harness_minus_base_student"] = stat(column("base", 1) - column("base", 0))
    return {"examples": len(ids), "conditions": conditions, "claims": claims}


# ---------------------------------------------------------------------------------------
# Report: table and plots.
# ---------------------------------------------------------------------------------------


def _fmt(s: dict) -> str:
    return f"{100 * s['mean']:.1f} [{100 * s['ci95'][0]:.1f}, {100 * s['ci95'][1]:.1f}]"


def write_table(results: dict, path: str) -> None:
    lines = ["| condition | seeds | student alone, % [95% CI] | harness re-attached, % [95% CI] | wall-clock s/run |",
             "|---|--:|--:|--:|--:|"]
    for name, s in results["summary"]["conditions"].items():
        secs = s["wall_seconds"]
        lines.append(f"| {name} | {s['seeds']} | {_fmt(s['student'])} | {_fmt(s['harness'])} | "
                     f"{np.mean(secs):.0f} |")
    lines += ["", "| claim (paired over examples) | difference, points [95% CI] |", "|---|--:|"]
    for name, s in results["summary"]["claims"].items():
        lines.append(f"| {name} | {_fmt(s)} |")
    earlier = [f"{os.path.basename(os.path.normpath(r['workdir']))} ({r['included_from']}"
               + (f"; {r['hardware']}" if r.get("hardware") else "") + ")"  # a record may say where it ran
               for rs in results["runs"].values() for r in rs if "included_from" in r]
    if earlier:
        lines += ["", "Runs taken from earlier reports (--include): " + ", ".join(earlier) + "."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_plots(results: dict, out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    runs, summary = results["runs"], results["summary"]["conditions"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rs in runs.items():
        for j, r in enumerate(rs):
            if len(r["curve"]) > 1:
                steps, acc = zip(*r["curve"])
                ax.plot(steps, np.array(acc) * 100, marker="o", label=name if j == 0 else None,
                        color=f"C{list(runs).index(name)}", alpha=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"held-out student accuracy, % (avg@{results['k']})")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(_save(fig, os.path.join(out, "student_accuracy_vs_step.png")))

    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(summary)
    x = np.arange(len(names))
    for off, key, label in ((-0.2, "student", "student alone"), (0.2, "harness", "harness re-attached")):
        means = np.array([summary[n][key]["mean"] for n in names]) * 100
        lo = means - np.array([summary[n][key]["ci95"][0] for n in names]) * 100
        hi = np.array([summary[n][key]["ci95"][1] for n in names]) * 100 - means
        ax.bar(x + off, means, 0.4, yerr=[lo, hi], capsize=3, label=label)
    ax.set_xticks(x, names)
    ax.set_ylabel("held-out accuracy after training, % (95% CI)")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    paths.append(_save(fig, os.path.join(out, "student_vs_harness.png")))

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rs in runs.items():
        for j, r in enumerate(rs):
            if r["loss"]:
                steps, loss = zip(*r["loss"])
                ax.plot(steps, loss, label=name if j == 0 else None, color=f"C{list(runs).index(name)}", alpha=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("distillation loss")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(_save(fig, os.path.join(out, "loss.png")))
    return paths


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------


def read_included(paths: list[str], *, quick: bool, k: int) -> dict[str, dict]:
    """Runs of earlier reports (their results.json), by work dir name (`ophsd_seed1`, `base`):
    a run's record there holds everything the report needs, so a run finished on another
    machine, or whose work dir is gone, can join this report without its work dir."""
    found: dict[str, dict] = {}
    for path in paths:
        try:
            with open(path) as f:
                earlier = json.load(f)
            if earlier["quick"] != quick or earlier["k"] != k:
                raise ValueError(f"--include {path}: its runs were made with quick={earlier['quick']}, "
                                 f"k={earlier['k']}; this report has quick={quick}, k={k}")
            for rs in earlier["runs"].values():
                for r in rs:
                    found.setdefault(os.path.basename(os.path.normpath(r["workdir"])), {**r, "included_from": path})
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"--include {path}: not a results.json of this script ({type(e).__name__}: {e})") from None
    return found


def replicate(base, out: str, *, conditions: list[str], seeds: list[int], quick: bool = False,
              report_only: bool = False, command: str = "", include: list[str] = ()) -> dict:
    """Run every condition (unless `report_only`), then write results.json, the table and plots.
    A run not finished here is taken from an `include`d earlier results.json, if it has it."""
    unknown = [x for x in conditions if x not in CONDITIONS]
    if unknown:
        raise ValueError(f"--conditions: unknown {unknown}; known: {list(CONDITIONS)}")
    os.makedirs(out, exist_ok=True)
    k = run_config(base, conditions[0], seeds[0], quick).eval.k
    included = read_included(list(include), quick=quick, k=k)
    runs: dict[str, list[dict]] = {}
    for name in conditions:
        for seed in (seeds if CONDITIONS[name][1] else [base.seed]):
            workdir = run_dir(out, name, seed)
            earlier = included.get(os.path.basename(workdir))
            steps = final_step(run_config(base, name, seed, quick), name)
            if not report_only and earlier is None:
                run_condition(base, name, seed, out, quick)
            if os.path.exists(final_eval_path(workdir, steps)):
                runs.setdefault(name, []).append(read_run(workdir, steps))
            elif earlier is not None:
                r = earlier
                log.info("%s: from %s (%s)", workdir, r["included_from"], r["workdir"])
                runs.setdefault(name, []).append(r)
            else:
                log.warning("%s: not finished, left out of the report", workdir)
    results = {"command": command, "quick": quick, "seeds": seeds, "k": k, "include": list(include),
               "runs": runs, "summary": summarize(runs)}
    with open(os.path.join(out, "results.json.tmp"), "w") as f:
        json.dump(results, f, indent=1)
    os.replace(os.path.join(out, "results.json.tmp"), os.path.join(out, "results.json"))
    write_table(results, os.path.join(out, "results.md"))
    write_plots(results, out)
    return results


def replicate_cli(base, out: str, **kwargs) -> dict:
    """`replicate` as the command runs it: an error leaves its traceback in `out/errors/`
    (`train.run_cli`); a stop (SIGTERM) is not an error: it exits with the line that says how
    to resume, and writes no traceback."""
    from ophsd_jax import train

    def run():
        try:
            return replicate(base, out, **kwargs)
        except Stopped as e:
            return e

    results = train.run_cli(run, out, command="replicate", create_workdir=True)
    if isinstance(results, Stopped):
        sys.exit(str(results))
    return results


def main(argv):
    del argv
    from ophsd_jax.run import Run

    command = "python -m ophsd_jax.experiments.replicate " + " ".join(sys.argv[1:])
    signal.signal(signal.SIGTERM, Run.request_stop)  # preemption: the run in progress saves its step and stops
    replicate_cli(FLAGS.config, FLAGS.out, conditions=[x for x in FLAGS.conditions.split(",") if x],
                  seeds=[int(x) for x in FLAGS.seeds.split(",") if x], quick=FLAGS.quick, report_only=FLAGS.report,
                  command=command, include=[x for x in FLAGS.include.split(",") if x])
    with open(os.path.join(FLAGS.out, "results.md")) as f:
        print(f.read())


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    from ophsd_jax.train import parse_flags

    config_flags.DEFINE_config_file("config", None, "the experiment's training config (configs/*.py)",
                                    lock_config=False)
    flags.DEFINE_string("out", None, "directory: one work dir per run, results.json, results.md, plots",
                        required=True)
    flags.DEFINE_string("conditions", ",".join(CONDITIONS), f"comma-separated, of {list(CONDITIONS)}")
    flags.DEFINE_string("seeds", "0,1", "seeds of the trained conditions")
    flags.DEFINE_bool("quick", False, "tiny sizes, a smoke test: " + json.dumps(QUICK))
    flags.DEFINE_bool("report", False, "only the report (results.json, table, plots) from the finished runs")
    flags.DEFINE_string("include", "", "comma-separated results.json of earlier reports: a run not finished "
                        "here is taken from them (and not run) when they have it, e.g. one run on another machine")
    FLAGS = flags.FLAGS
    app.run(main, flags_parser=parse_flags)
