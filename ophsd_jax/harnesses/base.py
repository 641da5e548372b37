"""The harness protocol and the one helper every harness uses to call the model.

A harness is an object with

    run(examples, generate_chat, final=None) -> list[HarnessResult]
    observe(examples) -> None        # after a training step (memory banks)
    state_dict() / load_state_dict() # for checkpoints (empty when stateless)

`generate_chat(list_of_message_lists, *, temperature, top_p, top_k,
max_new_tokens)` is the sampler's batched chat call: it returns the texts, either
as a list of strings or as an object with `.texts` and `.prompt_tokens` (the
sampler's `ChatOutput`: the token ids each reply was sampled after). Harnesses
never touch the model otherwise, which is why a scripted fake model can test
them. Every phase is one `generate_chat` call for the whole batch. A reply is
None where the prompt is longer than the sampler's largest prompt bucket
(nothing was generated): that example leaves the later phases and its result
is `skipped_result(phase, ...)` (mode `skipped_<phase>`, no teacher context).

Generate only what is used: the teacher context is the *messages* of the last call
(the final call); its *response* only feeds the harness reward. `final` (one bool per
example, None = all) says which examples need that response: for the others the
harness builds the final messages but leaves them out of the final call, and returns
`final_response=None`, `teacher_prompt_ids=None` (the trainer renders the messages).
The final call is still made, with the examples that need it (maybe none). A call
that is the final one for some examples and not for others (Draft-Verify's draft is
final where no label can be parsed) generates for all of them. The harness's first
call depends only on the examples, so the trainer generates the student's rollout in
the same sampler call (`sampling.GenerateChat(join=...)`); harnesses need not care.

The teacher scores the student's response after the harness's last prompt, so a
result carries that prompt's token ids when the model reported them (the distill
step then needs no re-rendering), and the harness's own inserted material (plan,
reference solution, retrieved examples) separately, so that an over-long teacher
context can be shortened in that material only (`distill.teacher_overflow`).

Multi-process rule: each process runs the harness on its own share of the
batch, and every `generate_chat` call is collective. So the number and order
of calls must not depend on the examples: always make a phase's call, even
with an empty list (`call_model` does).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Protocol

GenerateChat = Callable[..., object]  # list[str], or an object with .texts and .prompt_tokens


class HarnessError(RuntimeError):
    pass


SKIPPED = "skipped_"  # mode prefix of skipped results; the phase follows


@dataclasses.dataclass
class TeacherMaterial:
    """The harness's own inserted texts in a teacher context, and how to rebuild it.

    `rebuild(texts)` returns the teacher messages with `texts` (same length and order)
    in place of `self.texts`; `rebuild(self.texts)` is the teacher context itself. The
    problem, the instructions and the chat structure are never part of `texts`.
    """

    texts: list[str]
    rebuild: Callable[[list[str]], list[dict]]


@dataclasses.dataclass
class HarnessResult:
    """One example's harness output.

    teacher_messages:    the teacher context z(x) (messages of the last call).
    final_response:      the harness's answer (last call's response); None where it was
                         not generated (`final` was False for this example).
    mode:                which path ran (e.g. plan_solve / solve_only / cold_start / draft_only / full).
    trace:               every call for this example: {"name", "messages", "response"}.
    info:                extras for logging (parsed draft labels, retrieved ids, ...).
    teacher_prompt_ids:  the token ids the last call was sampled after (the rendered
                         teacher_messages), or None when no call was made or the model
                         did not report them; then the trainer renders teacher_messages
                         with the sampler's renderer and template kwargs.
    teacher_material:    the inserted material of teacher_messages, or None when there is
                         none (e.g. a zero-shot cold-start prompt).
    """

    teacher_messages: list[dict]
    final_response: str | None
    mode: str
    trace: list[dict]
    info: dict = dataclasses.field(default_factory=dict)
    teacher_prompt_ids: list[int] | None = None
    teacher_material: TeacherMaterial | None = None

    @property
    def skipped(self) -> bool:
        """A call's prompt did not fit the sampler: no teacher context, no answer."""
        return self.mode.startswith(SKIPPED)


def skipped_result(phase: str, messages: list[dict], trace: list[dict]) -> HarnessResult:
    """The result of an example whose `phase` call got None (its prompt did not fit)."""
    return HarnessResult(messages, "", SKIPPED + phase, trace, {"skipped_phase": phase})


class Harness(Protocol):
    name: str

    def run(self, examples: list[dict], generate_chat: GenerateChat,
            final: list[bool] | None = None) -> list[HarnessResult]: ...

    def observe(self, examples: list[dict]) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclasses.dataclass
class SamplingConfig:
    """Sampling for harness calls; harness configs inherit these fields."""

    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20


class Replies(NamedTuple):
    texts: list[str]
    prompt_ids: list[list[int]] | None  # the ids each text was sampled after; None if not reported


def call_model(
    generate_chat: GenerateChat,
    harness: str,
    phase: str,
    message_lists: list[list[dict]],
    sampling: SamplingConfig,
    max_new_tokens: int,
) -> Replies:
    """One batched call for a phase; checks the reply has one string (or None: the prompt
    did not fit the sampler) per conversation.

    Called even with no conversations: in a multi-process run `generate_chat` is a
    collective call that every process must make, also one whose share is empty.
    """
    out = generate_chat(
        message_lists,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        max_new_tokens=max_new_tokens,
    )
    responses = list(out.texts if hasattr(out, "texts") else out)
    prompt_ids = getattr(out, "prompt_tokens", None)
    if len(responses) != len(message_lists):
        raise HarnessError(
            f"{harness}/{phase}: generate_chat returned {len(responses)} responses for {len(message_lists)} prompts"
        )
    for i, r in enumerate(responses):
        if r is not None and not isinstance(r, str):
            raise HarnessError(f"{harness}/{phase}: response {i} is {type(r).__name__}, expected str or None")
    if prompt_ids is not None:
        prompt_ids = [[int(x) for x in p] for p in prompt_ids]
        if len(prompt_ids) != len(message_lists):
            raise HarnessError(f"{harness}/{phase}: generate_chat returned {len(prompt_ids)} prompt id lists "
                               f"for {len(message_lists)} prompts")
    return Replies(responses, prompt_ids)


def final_mask(final: list[bool] | None, n: int) -> list[bool]:
    """`final` (which examples need the final call's response) checked, None = all."""
    if final is None:
        return [True] * n
    if len(final) != n:
        raise HarnessError(f"final has {len(final)} entries for {n} examples")
    return [bool(f) for f in final]


def prompt_ids_at(replies: Replies, i: int) -> list[int] | None:
    """The ids reply `i` was sampled after, or None when the model did not report them."""
    return None if replies.prompt_ids is None else replies.prompt_ids[i]


def trace_entry(name: str, messages: list[dict], response: str) -> dict:
    return {"name": name, "messages": messages, "response": response}


def config_from(cls, config=None, **overrides):
    """Build dataclass `cls` from a dict / ml_collections ConfigDict / instance.

    Unknown keys are an error naming the key, so a typo in a config file
    cannot silently fall back to a default.
    """
    if config is None:
        values = {}
    elif isinstance(config, cls):
        values = dataclasses.asdict(config)
    elif hasattr(config, "to_dict"):
        values = config.to_dict()
    else:
        values = dict(config)
    values.update(overrides)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown option(s) {unknown}; known: {sorted(known)}")
    return cls(**values)
