"""Paired student/teacher batches that score the same response tokens.

For each example the student sequence is ``student prompt + response`` and the
teacher sequence is ``teacher prompt + response``; both end with the identical
response tokens. A prompt is the token ids the sampler conditioned on when it is
given (the rollout's prompt ids for the student, the harness's last call's for
the teacher); otherwise its messages are rendered with the same renderer and
template kwargs (``model.chat_template_kwargs``) the sampler uses, e.g. for a
teacher context that was never sampled. So the response is scored after exactly
the prefix it was sampled after. The loss compares the hidden states that
predict each response token, so each side carries a ``resp_index [B, R]``: the
position whose next-token prediction is response token ``r``. Gathering the
final hidden states at ``student.resp_index`` and at ``teacher.resp_index``
gives two ``[B, R, D]`` arrays aligned token by token, with the shared
``resp_mask [B, R]``.

Layout and rules:

* Right padding: each row is ``prompt + response`` starting at position 0,
  followed by ``pad_id``. Position ids count from 0 at the first token; padding
  gets position 0 and ``attn_mask`` 0. ``resp_index[r] = len(prompt) - 1 + r``.
* Static shapes: the student length, teacher length and response length are
  each rounded up, separately, to the smallest bucket that fits the longest
  row of the batch. With ``batch_size`` the batch is padded with dummy rows
  (``row_mask`` 0, ``resp_mask`` 0) so the batch dimension is static too.
  Dummy rows hold a single attended pad token, so no attention row is empty.
* An optional ``max_response_tokens`` keeps only the first tokens of each
  response (later tokens cannot influence earlier predictions, so the
  sequences simply stop there).
* A teacher ``prompt + response`` longer than the largest teacher bucket is never
  cut in its problem or chat structure, nor in its response
  (``teacher_overflow``): ``"skip"`` skips the pair (reason ``teacher_too_long``);
  ``"shorten"`` cuts only the harness's inserted material (plan, reference
  solution, retrieved examples: the result's ``TeacherMaterial``), each piece to
  at most the same number of characters followed by :data:`SHORTENED_MARKER`,
  keeping as much as fits; a pair without material, or that does not fit even
  with the material cut away, is skipped as ``teacher_too_long``.
* Examples that cannot be built are skipped and counted by reason, never
  silently misaligned: an empty response, an empty student or teacher prompt,
  a response longer than the largest response bucket, a student
  ``prompt + response`` longer than the largest student bucket (the student
  prompt is what the student sampled from, so it is not truncated), a
  response that leaves no room for a single teacher prompt token, or an
  over-long teacher context (above). The caller adds its own reasons
  (``skip``): a rollout or harness prompt longer than the sampler's largest
  prompt bucket, which left nothing to pair.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

SKIP_REASONS = (
    "rollout_prompt_too_long",  # decided by the caller (`skip`): the sampler could not take the prompt
    "harness_prompt_too_long",  # decided by the caller: a harness call's prompt did not fit the sampler
    "empty_response",
    "empty_student_prompt",
    "empty_teacher_prompt",
    "response_too_long",
    "student_too_long",
    "teacher_no_room",
    "teacher_too_long",
)
TEACHER_OVERFLOW = ("skip", "shorten")
SHORTENED_MARKER = " […]"  # ends a piece of harness material cut to fit the teacher bucket


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Allowed (static) lengths, each sorted ascending."""

    student: tuple[int, ...]
    teacher: tuple[int, ...]
    response: tuple[int, ...]

    @classmethod
    def make(cls, buckets: Sequence[int] | Mapping[str, Sequence[int]] | "Buckets") -> "Buckets":
        """From one list used for all three lengths, or a mapping/config with
        ``student``, ``teacher`` and ``response`` lists."""
        if isinstance(buckets, Buckets):
            return buckets
        if hasattr(buckets, "keys"):  # dict or ml_collections.ConfigDict
            parts = [buckets[k] for k in ("student", "teacher", "response")]
        else:
            parts = [buckets] * 3
        out = []
        for name, p in zip(("student", "teacher", "response"), parts):
            p = tuple(sorted(int(x) for x in p))
            if not p or p[0] < 1:
                raise ValueError(f"{name} buckets must be non-empty positive ints, got {p}")
            out.append(p)
        return cls(*out)


def _fit(buckets: tuple[int, ...], n: int) -> int:
    """Smallest bucket >= n."""
    return buckets[bisect.bisect_left(buckets, n)]


@dataclasses.dataclass(frozen=True)
class SideBatch:
    """One side (student or teacher) of a :class:`PairBatch`."""

    tokens: np.ndarray  # [B, L] int32, right-padded with pad_id
    positions: np.ndarray  # [B, L] int32, 0-based from the first token; 0 on padding
    attn_mask: np.ndarray  # [B, L] int32, 1 on real tokens
    resp_index: np.ndarray  # [B, R] int32, position predicting response token r


@dataclasses.dataclass(frozen=True)
class BatchMeta:
    """Host-side bookkeeping; not part of the pytree."""

    num_examples: int
    num_valid: int
    skip_reasons: dict[str, int]
    teacher_shortened: int  # teacher contexts whose harness material was cut to fit
    response_capped: int  # responses shortened by max_response_tokens
    kept: tuple[int, ...]  # input index of each valid row, in row order

    @property
    def skipped(self) -> int:
        return sum(self.skip_reasons.values())

    def metrics(self, prefix: str = "batch/") -> dict[str, int]:
        out = {
            f"{prefix}skipped": self.skipped,
            f"{prefix}valid": self.num_valid,
            f"{prefix}teacher_shortened": self.teacher_shortened,
            f"{prefix}response_capped": self.response_capped,
        }
        out.update({f"{prefix}skipped_{k}": v for k, v in self.skip_reasons.items()})
        return out


@dataclasses.dataclass(frozen=True)
class PairBatch:
    """Aligned student/teacher sequences.

    A pytree whose leaves are the arrays; ``meta`` is host-side only and is
    ``None`` after any JAX tree operation (``jax.device_put``, ``jit``), so
    read it before handing the batch to the train step.
    """

    student: SideBatch
    teacher: SideBatch
    resp_tokens: np.ndarray  # [B, R] int32, the response ids (pad_id past the end)
    resp_mask: np.ndarray  # [B, R] float32, 1 on response tokens used by the loss
    row_mask: np.ndarray  # [B] float32, 0 on dummy rows
    meta: BatchMeta | None = None


jax.tree_util.register_dataclass(
    SideBatch, data_fields=["tokens", "positions", "attn_mask", "resp_index"], meta_fields=[]
)
jax.tree_util.register_pytree_node(
    PairBatch,
    lambda b: ((b.student, b.teacher, b.resp_tokens, b.resp_mask, b.row_mask), None),
    lambda _, children: PairBatch(*children),
)


def _side(prompts: list[list[int]], responses: list[list[int]], length: int, r: int, pad_id: int,
          batch: int) -> SideBatch:
    tokens = np.full((batch, length), pad_id, np.int32)
    positions = np.zeros((batch, length), np.int32)
    attn = np.zeros((batch, length), np.int32)
    resp_index = np.zeros((batch, r), np.int32)
    for i, (p, y) in enumerate(zip(prompts, responses)):
        n = len(p) + len(y)
        tokens[i, :n] = p + y
        positions[i, :n] = np.arange(n)
        attn[i, :n] = 1
        resp_index[i, : len(y)] = len(p) - 1 + np.arange(len(y))
    attn[len(prompts):, 0] = 1  # dummy rows: one attended pad token
    return SideBatch(tokens, positions, attn, resp_index)


def render_prompt(tokenizer: Any, messages: list[dict], template_kwargs: Mapping | None = None) -> list[int]:
    """Prompt ids as the sampler renders them (`sampling.generate_chat_tokens`)."""
    return [int(x) for x in tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                          **dict(template_kwargs or {}))]


def shorten_teacher_prompt(render: Callable[[list[dict]], list[int]], material: Any, room: int) -> list[int] | None:
    """The teacher prompt with its harness material cut to fit in ``room`` tokens.

    ``material`` has ``texts`` and ``rebuild(texts) -> messages`` (a
    ``harnesses.base.TeacherMaterial``). Every piece longer than a cap C characters
    keeps its first C characters and gets :data:`SHORTENED_MARKER`; C is the
    largest that fits (binary search; each try renders the whole prompt, so the
    result always fits). None when even C = 0 does not fit.
    """
    texts = list(material.texts)
    if not texts:
        return None

    def build(cap: int) -> list[int]:
        return render(material.rebuild([t if len(t) <= cap else t[:cap].rstrip() + SHORTENED_MARKER for t in texts]))

    best = build(0)
    if len(best) > room:
        return None
    lo, hi = 0, max(len(t) for t in texts)  # build(lo) fits; build(hi), the full context, does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ids = build(mid)
        if len(ids) <= room:
            lo, best = mid, ids
        else:
            hi = mid
    return best


def build_pair_batch(
    tokenizer: Any,
    student_messages: Sequence[list[dict]],
    teacher_messages: Sequence[list[dict]],
    responses: Sequence[Sequence[int]],
    *,
    buckets: Sequence[int] | Mapping[str, Sequence[int]] | Buckets,
    max_response_tokens: int | None = None,
    batch_size: int | None = None,
    pad_id: int | None = None,
    student_prompt_ids: Sequence[Sequence[int] | None] | None = None,
    teacher_prompt_ids: Sequence[Sequence[int] | None] | None = None,
    template_kwargs: Mapping | None = None,
    teacher_overflow: str = "skip",
    teacher_material: Sequence[Any] | None = None,
    skip: Sequence[str | None] | None = None,
) -> PairBatch:
    """Build a :class:`PairBatch` (see the module docstring for the rules).

    Args:
      tokenizer: has ``apply_chat_template(messages, add_generation_prompt=True,
        **template_kwargs) -> list[int]`` and ``pad_token_id``.
      student_messages, teacher_messages: chat messages per example.
      responses: the sampled response token ids per example (used as given,
        e.g. including a final stop token if the sampler returns it).
      buckets: one sorted list of lengths for all three dimensions, or a
        mapping / config with ``student``, ``teacher`` and ``response`` lists.
      max_response_tokens: optional cap on the response tokens used.
      batch_size: pad the batch with dummy rows to this many rows.
      pad_id: padding id; defaults to ``tokenizer.pad_token_id`` (or 0).
      student_prompt_ids, teacher_prompt_ids: per example, the ids the sampler
        conditioned on (used as given), or None to render that example's messages.
      template_kwargs: the sampler's chat template kwargs, for rendering.
      teacher_overflow: ``"skip"`` or ``"shorten"`` (module docstring).
      teacher_material: per example, the harness material of the teacher
        context (``TeacherMaterial`` or None), for ``"shorten"``.
      skip: per example, None or a reason (in ``SKIP_REASONS``) to skip it, counted
        with the builder's own skips.
    """
    n_in = len(responses)
    lists = {"student": student_messages, "teacher": teacher_messages, "student_prompt_ids": student_prompt_ids,
             "teacher_prompt_ids": teacher_prompt_ids, "teacher_material": teacher_material}
    if any(v is not None and len(v) != n_in for v in lists.values()):
        raise ValueError(f"got {n_in} responses and " + ", ".join(
            f"{len(v)} {k}" for k, v in lists.items() if v is not None))
    if teacher_overflow not in TEACHER_OVERFLOW:
        raise ValueError(f"teacher_overflow must be one of {list(TEACHER_OVERFLOW)}, got {teacher_overflow!r}")
    student_prompt_ids = student_prompt_ids or [None] * n_in
    teacher_prompt_ids = teacher_prompt_ids or [None] * n_in
    teacher_material = teacher_material or [None] * n_in
    render = lambda m: render_prompt(tokenizer, m, template_kwargs)  # noqa: E731
    bk = Buckets.make(buckets)
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_token_id", None)
        pad_id = 0 if pad_id is None else int(pad_id)
    max_s, max_t, max_r = bk.student[-1], bk.teacher[-1], bk.response[-1]
    skip = [None] * len(responses) if skip is None else list(skip)
    if len(skip) != len(responses) or any(r is not None and r not in SKIP_REASONS for r in skip):
        raise ValueError(f"skip: need one reason in {SKIP_REASONS} or None per example, got {skip}")

    skips = collections.Counter()
    shortened = capped = 0
    kept, s_prompts, t_prompts, resps = [], [], [], []
    for i, (sm, tm, y) in enumerate(zip(student_messages, teacher_messages, responses)):
        if skip[i]:
            skips[skip[i]] += 1
            continue
        y = [int(x) for x in y]
        if max_response_tokens is not None and len(y) > max_response_tokens:
            y = y[:max_response_tokens]
            capped += 1
        sp = render(sm) if student_prompt_ids[i] is None else [int(x) for x in student_prompt_ids[i]]
        tp = render(tm) if teacher_prompt_ids[i] is None else [int(x) for x in teacher_prompt_ids[i]]
        if not y:
            reason = "empty_response"
        elif not sp:
            reason = "empty_student_prompt"
        elif not tp:
            reason = "empty_teacher_prompt"
        elif len(y) > max_r:
            reason = "response_too_long"
        elif len(sp) + len(y) > max_s:
            reason = "student_too_long"
        elif len(y) + 1 > max_t:
            reason = "teacher_no_room"
        else:
            reason = None
        room = max_t - len(y)
        if reason is None and len(tp) > room:  # never cut the problem, template or response
            material = teacher_material[i] if teacher_overflow == "shorten" else None
            tp = shorten_teacher_prompt(render, material, room) if material is not None else None
            if tp is None:
                reason = "teacher_too_long"
            else:
                shortened += 1
        if reason:
            skips[reason] += 1
            continue
        kept.append(i)
        s_prompts.append(sp)
        t_prompts.append(tp)
        resps.append(y)

    n = len(kept)
    rows = n if batch_size is None else batch_size
    if rows < n:
        raise ValueError(f"{n} valid examples do not fit batch_size={batch_size}")
    len_s = _fit(bk.student, max((len(p) + len(y) for p, y in zip(s_prompts, resps)), default=1))
    len_t = _fit(bk.teacher, max((len(p) + len(y) for p, y in zip(t_prompts, resps)), default=1))
    len_r = _fit(bk.response, max((len(y) for y in resps), default=1))

    resp_tokens = np.full((rows, len_r), pad_id, np.int32)
    resp_mask = np.zeros((rows, len_r), np.float32)
    for i, y in enumerate(resps):
        resp_tokens[i, : len(y)] = y
        resp_mask[i, : len(y)] = 1.0
    row_mask = np.zeros((rows,), np.float32)
    row_mask[:n] = 1.0

    meta = BatchMeta(
        num_examples=len(responses),
        num_valid=n,
        skip_reasons={k: skips.get(k, 0) for k in SKIP_REASONS},
        teacher_shortened=shortened,
        response_capped=capped,
        kept=tuple(kept),
    )
    return PairBatch(
        student=_side(s_prompts, resps, len_s, len_r, pad_id, rows),
        teacher=_side(t_prompts, resps, len_t, len_r, pad_id, rows),
        resp_tokens=resp_tokens,
        resp_mask=resp_mask,
        row_mask=row_mask,
        meta=meta,
    )
