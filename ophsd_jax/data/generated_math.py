"""Offline math problems from `reasoning-gym`, with worked solutions.

The embedded default needs math problems without downloading anything.
reasoning-gym generates them from a seed; for the families used here we
write the worked solution ourselves (chain sums: running totals; products:
place-value partial products) or take the generator's own chain of thought
(gsm_symbolic). Every solution is checked against the generator's answer,
so a mismatch fails loudly instead of teaching a wrong solution.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

FAMILIES = ("chain_sum", "products", "gsm_symbolic")


def chain_sum_solution(expression: str) -> tuple[str, int]:
    """'57 + 87 - 70' -> ('57 + 87 = 144.\\n144 - 70 = 74.', 74): left to right."""
    tokens = expression.split()
    if len(tokens) < 3 or len(tokens) % 2 == 0:
        raise ValueError(f"unexpected chain-sum expression {expression!r}")
    total = int(tokens[0])
    lines = []
    for op, operand in zip(tokens[1::2], tokens[2::2]):
        value = int(operand)
        if op not in "+-":
            raise ValueError(f"unexpected operator {op!r} in {expression!r}")
        new_total = total + value if op == "+" else total - value
        lines.append(f"{total} {op} {value} = {new_total}.")
        total = new_total
    return "Add and subtract from left to right.\n" + "\n".join(lines), total


def product_solution(expression: str) -> tuple[str, int]:
    """'123 * 45' -> partial products of 123 by each place value of 45, then their sum."""
    a_text, b_text = [t.strip() for t in expression.split("*")]
    a, b = int(a_text), int(b_text)
    digits = str(abs(b))
    parts = []
    for i, d in enumerate(digits):
        place = int(d) * 10 ** (len(digits) - 1 - i)
        if place:
            parts.append((place, a * place))
    sign = -1 if b < 0 else 1
    lines = [f"Split {abs(b)} by place value: {' + '.join(str(p) for p, _ in parts) or '0'}."]
    lines += [f"{a} * {p} = {v}." for p, v in parts]
    total = sign * sum(v for _, v in parts)
    if len(parts) > 1:
        lines.append(f"Add the partial products: {' + '.join(str(v) for _, v in parts)} = {abs(total)}.")
    if sign < 0:
        lines.append(f"The second factor is negative, so the product is {total}.")
    return "\n".join(lines), total


def _gsm_symbolic_solution(cot: str) -> str:
    # The chain of thought ends with '#### <answer>'; the answer is stored separately.
    return re.sub(r"\n?####.*$", "", cot.strip(), flags=re.S).strip()


def _one_example(family: str, item: dict, index: int, seed: int) -> dict:
    meta = item["metadata"]
    answer = str(item["answer"]).strip()
    if family == "chain_sum":
        solution, value = chain_sum_solution(meta["expression"])
    elif family == "products":
        solution, value = product_solution(meta["expression"])
    else:
        solution, value = _gsm_symbolic_solution(meta["answer_cot"]), None
    if value is not None and str(value) != answer:
        raise ValueError(f"{family} item {index}: worked solution gives {value}, generator says {answer}")
    return {
        "id": f"{family}-s{seed}-{index:06d}",
        "question": item["question"].strip(),
        "answer": answer,
        "solution": f"{solution}\nThe answer is {answer}.",
        "source": f"reasoning_gym/{family}",
    }


def generate_math_problems(size: int, seed: int, families=FAMILIES, options: dict | None = None) -> list[dict]:
    """`size` problems, round-robin over `families`, deterministic for `seed`.
    `options`: {family: generator settings} (reasoning-gym's config fields, e.g.
    {"chain_sum": {"max_terms": 3, "max_digits": 2}}), the difficulty of that family."""
    import reasoning_gym  # lazy: heavy import, only needed to generate

    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown reasoning-gym families {unknown}; choose from {FAMILIES}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    options = dict(options or {})
    unused = sorted(set(options) - set(families))
    if unused:
        raise ValueError(f"reasoning-gym options for {unused}, which are not among the families {list(families)}")
    per_family = [size // len(families) + (i < size % len(families)) for i in range(len(families))]
    generated = []
    for k, (family, n) in enumerate(zip(families, per_family)):
        if n == 0:
            continue
        settings = dict(options.get(family) or {})
        reserved = sorted(set(settings) & {"seed", "size"})
        if reserved:
            raise ValueError(f"reasoning-gym options for {family}: {reserved} are set by the source spec, not here")
        try:
            dataset = reasoning_gym.create_dataset(family, seed=seed + 1000 * k, size=n, **settings)
        except (TypeError, AssertionError, ValueError) as e:
            raise ValueError(f"reasoning-gym options for {family} {settings}: {e or type(e).__name__}") from None
        generated.append([_one_example(family, dataset[i], i, seed) for i in range(n)])
    # Interleave families so any prefix of the list mixes them.
    out = []
    for i in range(max(per_family)):
        out += [g[i] for g in generated if i < len(g)]
    return out


_CHILD = """
import json, sys
from ophsd_jax.data.generated_math import generate_math_problems
a = json.load(sys.stdin)
try:
    out = generate_math_problems(a["size"], a["seed"], tuple(a["families"]), a["options"])
except ValueError as e:
    print(json.dumps({"error": str(e)}))
else:
    print(json.dumps({"examples": out}))
"""


def generate_math_problems_in_child(size: int, seed: int, families=FAMILIES, options: dict | None = None) -> list[dict]:
    """`generate_math_problems` in a child Python process. Importing reasoning-gym loads
    sympy, matplotlib and the rest of its generators (~0.1 GB) that would stay resident in
    the trainer for the whole run; only the examples (JSON) come back. Same errors."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    args = {"size": size, "seed": seed, "families": list(families), "options": options or {}}
    proc = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(args), capture_output=True, text=True,
                          env=env)
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        raise RuntimeError(f"generating reasoning-gym problems failed in a child process: {tail[0]}") from None
    if "error" in result:
        raise ValueError(result["error"])
    return result["examples"]
