"""Re-score the USPTO runs of docs/results.md ("USPTO on an H200") counting only tagged
`[class]N<eoa>` answers (`task_options.tagged_only`, which those runs predate), from each run's
per-example records:

    python docs/results/uspto_gpu/rescore_tagged.py runs/replicate_uspto_gpu > docs/results/uspto_gpu/tagged.json
"""

import glob
import json
import os
import re
import sys

import numpy as np

from ophsd_jax.data.tasks import make_task
from ophsd_jax.experiments.replicate import stat

TASK = make_task("uspto", tagged_only=True)


def scores(path):
    """{id: (student mean over its samples, harness 1/0 or None)}, tagged answers only."""
    out = {}
    for line in open(path):
        r = json.loads(line)
        ex = {"answer": TASK.parse_labels(r["reference"])[0]}
        student = float(np.mean([TASK.reward(x, ex) for x in r["responses"]]))
        harness = TASK.reward(r["harness_response"] or "", ex) if "harness_response" in r else None
        out[str(r["id"])] = (student, harness)
    return out


def main(out_dir):
    runs = {}
    for workdir in sorted(glob.glob(os.path.join(out_dir, "*", "eval"))):
        name = os.path.basename(os.path.dirname(workdir))
        steps = sorted(int(m.group(1)) for p in glob.glob(os.path.join(workdir, "step_*.jsonl"))
                       if (m := re.fullmatch(r"step_(\d+)\.jsonl", os.path.basename(p))))
        curve = {s: stat([v[0] for v in scores(os.path.join(workdir, f"step_{s}.jsonl")).values()]) for s in steps}
        final = glob.glob(os.path.join(workdir, "step_*_harness.jsonl"))
        run = {"student_by_step": curve}
        if final:
            ex = scores(final[0])
            run["final_step"] = int(re.search(r"step_(\d+)_", final[0]).group(1))
            run["student"] = stat([v[0] for v in ex.values()])
            run["harness"] = stat([v[1] or 0.0 for v in ex.values()])
            run["harness_minus_student"] = stat([(v[1] or 0.0) - v[0] for v in ex.values()])
            run["examples"] = {k: list(v) for k, v in ex.items()}
        runs[name] = run
    json.dump({"scoring": "tagged [class]N<eoa> answers only", "runs": runs}, sys.stdout, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
