"""Where examples come from: a JSON-serialisable source spec -> example dicts.

A spec is a plain dict so it can live in an ml_collections config and be
hashed into a dataset fingerprint:

    {"kind": "gsm8k_jsonl", "path": "train.jsonl", "on_error": "skip"}
    {"kind": "reasoning_gym", "size": 2000, "seed": 0, "families": ["chain_sum"],
     "options": {"chain_sum": {"max_terms": 3, "max_digits": 2}}}  # optional: difficulty
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib

import numpy as np

from ophsd_jax.data.generated_math import FAMILIES, generate_math_problems_in_child
from ophsd_jax.data.load_lawbench import load_lawbench
from ophsd_jax.data.load_math import load_gsm8k_jsonl, load_math_json
from ophsd_jax.data.load_uspto import load_uspto_csv, load_uspto_json

logger = logging.getLogger(__name__)

FILE_LOADERS = {
    "math_json": load_math_json,
    "gsm8k_jsonl": load_gsm8k_jsonl,
    "lawbench_json": load_lawbench,
    "uspto_csv": load_uspto_csv,
    "uspto_json": load_uspto_json,
}
GENERATED_KINDS = ("reasoning_gym",)
# Which source kinds make sense for which task.
TASK_KINDS = {
    "math": ("math_json", "gsm8k_jsonl", "reasoning_gym"),
    "lawbench": ("lawbench_json",),
    "uspto": ("uspto_csv", "uspto_json"),
}
_FILE_KEYS = {"kind", "path", "on_error"}
# on_error is accepted (and unused) so one config can set it for any kind.
_GENERATED_KEYS = {"kind", "size", "seed", "families", "options", "on_error"}


def check_spec(spec: dict) -> dict:
    """Validate a source spec; returns a normalised copy (defaults filled in)."""
    spec = dict(spec)
    kind = spec.get("kind")
    if kind in FILE_LOADERS:
        unknown = set(spec) - _FILE_KEYS
        if unknown:
            raise ValueError(f"source spec: unknown keys {sorted(unknown)} for kind {kind!r}")
        if not spec.get("path"):
            raise ValueError(f"source spec: kind {kind!r} needs 'path'")
        spec["path"] = str(pathlib.Path(spec["path"]).expanduser().resolve())
        spec.setdefault("on_error", "raise")
    elif kind in GENERATED_KINDS:
        unknown = set(spec) - _GENERATED_KEYS
        if unknown:
            raise ValueError(f"source spec: unknown keys {sorted(unknown)} for kind {kind!r}")
        spec.pop("on_error", None)
        spec.setdefault("seed", 0)
        spec["families"] = list(spec.get("families") or FAMILIES)
        if not spec.get("options"):
            spec.pop("options", None)  # absent and empty are the same data (and fingerprint)
        elif not isinstance(spec["options"], dict):
            raise ValueError(f"source spec: 'options' must be a dict of family -> settings, got {spec['options']!r}")
        else:
            spec["options"] = {f: dict(v) for f, v in spec["options"].items()}
        if int(spec.get("size", 0)) < 1:
            raise ValueError("source spec: kind 'reasoning_gym' needs 'size' >= 1")
    else:
        raise ValueError(f"source spec: unknown kind {kind!r}; choose from {sorted(FILE_LOADERS) + list(GENERATED_KINDS)}")
    return spec


def load_source(spec: dict) -> tuple[list[dict], dict | None]:
    """Examples for a spec, plus the loader's report (None for generated data)."""
    spec = check_spec(spec)
    if spec["kind"] in GENERATED_KINDS:
        return generate_math_problems_in_child(int(spec["size"]), int(spec["seed"]), tuple(spec["families"]),
                                               spec.get("options")), None
    examples, report = FILE_LOADERS[spec["kind"]](spec["path"], on_error=spec["on_error"])
    return examples, report.to_dict()


def fingerprint(spec: dict, extra: dict) -> str:
    """Short hash of the spec, split settings and the file's bytes: a new one rebuilds."""
    spec = check_spec(spec)
    h = hashlib.sha256(json.dumps({"spec": spec, "extra": extra, "split": _SPLIT_RULE}, sort_keys=True).encode())
    if "path" in spec:
        path = pathlib.Path(spec["path"])
        if path.is_file():
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


# Changes when the split's rule does, so datasets built by the old rule are rebuilt.
_SPLIT_RULE = "seeded-choice; train drops copies of validation examples"


def _content(example: dict) -> str:
    return json.dumps({k: v for k, v in example.items() if k not in ("id", "source")}, sort_keys=True)


def split_examples(examples: list[dict], validation_size: float | int, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic train/validation split: a seeded choice of validation rows.

    `validation_size` is a count (int >= 0) or a fraction in [0, 1). Both
    splits keep the file's order, so the split is readable and stable. A training
    row with the same content as a validation row (generated data repeats small
    problems; files repeat rows) is dropped, so held-out examples are never trained on.
    """
    n = len(examples)
    if isinstance(validation_size, float) and not isinstance(validation_size, bool):
        if not 0.0 <= validation_size < 1.0:
            raise ValueError(f"validation_size fraction must be in [0, 1), got {validation_size}")
        n_val = int(round(validation_size * n))
    else:
        n_val = int(validation_size)
    if not 0 <= n_val < n:
        raise ValueError(f"validation_size {validation_size} leaves no training data out of {n} examples")
    chosen = np.zeros(n, dtype=bool)
    chosen[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    val = [e for e, c in zip(examples, chosen) if c]
    held_out = {_content(e) for e in val}
    train = [e for e, c in zip(examples, chosen) if not c and _content(e) not in held_out]
    if len(train) + len(val) < n:
        logger.info("split: %d training examples dropped (copies of validation examples)", n - len(train) - len(val))
    if not train:
        raise ValueError(f"validation_size {validation_size}: every training example is a copy of a validation one")
    return train, val
