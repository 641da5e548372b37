"""The H200 runs of docs/results.md ("USPTO with Draft–Verify, on a lent H200"), scored on
tagged `[class]N<eoa>` answers only (tagged.json, from `rescore_tagged.py`), as a
results.json of `ophsd_jax.experiments.replicate`, so that a later report can take them
with `--include` (their work dirs are gone; the records hold what a report needs):

    python docs/results/uspto_gpu/tagged_results.py > docs/results/uspto_gpu/results_tagged.json

Per-example scores and the student curves are tagged.json's; the losses and wall-clock are
the original results.json's (scoring does not change them). Runs without a final
evaluation (the two `opsd` runs) are left out. Example ids are named after the data file
(`<file stem>-<row>`); the H200 read a copy of `schneider_dataSetA.csv` named `uspto.csv`,
so its ids are renamed to the committed config's file (same rows, same split).
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
COPY, FILE = "uspto-", "schneider_dataSetA-"  # id prefixes: the copy the H200 read, the committed data file


def main():
    with open(os.path.join(HERE, "tagged.json")) as f:
        tagged = json.load(f)["runs"]
    with open(os.path.join(HERE, "results.json")) as f:
        original = json.load(f)
    runs = {}
    for condition, rs in original["runs"].items():
        for r in rs:
            name = os.path.basename(os.path.normpath(r["workdir"]))
            t = tagged[name]
            if "examples" not in t:
                continue
            runs.setdefault(condition, []).append({
                "workdir": r["workdir"], "examples": {FILE + i.removeprefix(COPY): v for i, v in t["examples"].items()},
                "curve": sorted([int(s), v["mean"]] for s, v in t["student_by_step"].items()),
                "loss": r["loss"], "wall_seconds": r["wall_seconds"], "hardware": "one NVIDIA H200 (sixth session)",
                "scoring": "tagged [class]N<eoa> answers only, re-scored from the run's records"})
    json.dump({"command": original["command"] + "  # re-scored: docs/results/uspto_gpu/tagged_results.py",
               "quick": original["quick"], "seeds": original["seeds"], "k": original["k"], "include": [],
               "runs": runs}, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
