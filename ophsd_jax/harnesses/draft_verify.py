"""Draft–Verify harness for classification, backed by an online memory bank.

- Bank smaller than `cold_start_threshold`: one zero-shot call with the
  student's own prompt (mode `cold_start`).
- Otherwise, draft: the `draft_k` nearest labelled cases plus the task.
  The draft answer is parsed; if no label can be read, the draft call is the
  teacher context (mode `draft_only`).
- Verify: the `confirm_k` nearest cases sharing a draft label and the
  `challenge_k` nearest cases sharing none, and a request to keep or revise
  the draft (mode `full`); its messages are the teacher context.
- A call whose prompt did not fit the sampler skips the example (mode
  `skipped_<phase>`, no teacher context).

Every phase is one batched `generate_chat` call. The bank never sees a
batch's labels before the batch is answered: `observe(examples)` (after the
training step) adds them. A query never retrieves its own entry (same id),
so later epochs cannot leak an example's label to itself.
"""

from __future__ import annotations

import dataclasses

from ophsd_jax.harnesses import draft_verify_prompts as prompts
from ophsd_jax.harnesses.base import (HarnessResult, SamplingConfig, TeacherMaterial, call_model, config_from,
                                     final_mask, prompt_ids_at, skipped_result, trace_entry)
from ophsd_jax.harnesses.embedders import make_embedder
from ophsd_jax.harnesses.memory_bank import MemoryBank


@dataclasses.dataclass
class DraftVerifyConfig(SamplingConfig):
    cold_start_threshold: int = 10
    draft_k: int = 5
    confirm_k: int = 5
    challenge_k: int = 5
    draft_max_tokens: int = 512
    verify_max_tokens: int = 1024
    # Neighbour texts in prompts are clipped to this many characters (0: no clipping).
    max_example_chars: int = 400
    embedder: str = "tfidf"
    # Overrides on top of the task's recommended embedder options.
    embedder_options: dict = dataclasses.field(default_factory=dict)
    # Put all training examples in the bank at start instead of growing it online.
    seed_bank_from_train: bool = False


class DraftVerifyHarness:
    name = "draft_verify"

    def __init__(self, task, config=None, *, bank: MemoryBank | None = None, train_examples=None):
        if not getattr(task, "is_classification", False):
            raise ValueError(f"draft_verify needs a classification task, got {task.name!r}")
        self.task = task
        self.config = config_from(DraftVerifyConfig, config)
        self.bank = bank if bank is not None else self._new_bank(train_examples)
        if self.config.seed_bank_from_train:
            if not train_examples:
                raise ValueError("draft_verify: seed_bank_from_train=True needs train_examples")
            self.observe(train_examples)

    def _new_bank(self, train_examples) -> MemoryBank:
        cfg = self.config
        options = dict(getattr(self.task, "embedder_options", {})) if cfg.embedder == "tfidf" else {}
        options.update(cfg.embedder_options)
        embedder = make_embedder(cfg.embedder, **options)
        if not embedder.fitted:
            if not train_examples:
                raise ValueError(
                    f"draft_verify: embedder {cfg.embedder!r} must be fitted on the training texts; "
                    "pass train_examples (labels are not used for fitting) or a fitted bank"
                )
            embedder.fit([self.task.case_text(e) for e in train_examples])
        return MemoryBank(embedder)

    def observe(self, examples: list[dict]) -> None:
        """Add labelled examples (true labels) to the bank; call after each step."""
        self.bank.add(
            [self.task.case_text(e) for e in examples],
            [self.task.label(e) for e in examples],
            ids=[e["id"] for e in examples],
        )

    def run(self, examples: list[dict], generate_chat, final: list[bool] | None = None) -> list[HarnessResult]:
        final = final_mask(final, len(examples))
        if len(self.bank) < self.config.cold_start_threshold:
            return self._cold_start(examples, generate_chat, final)
        cfg, task = self.config, self.task
        max_chars = cfg.max_example_chars or None
        query = self.bank.embed([task.case_text(e) for e in examples])
        self_ids = [[e["id"]] for e in examples]

        draft_hits = self.bank.search(query_embeddings=query, k=cfg.draft_k, exclude_ids=self_ids)
        draft_msgs = [prompts.draft_messages(task, e, h, max_chars) for e, h in zip(examples, draft_hits)]
        draft = call_model(generate_chat, self.name, "draft", draft_msgs, cfg, cfg.draft_max_tokens)
        drafts = draft.texts
        draft_labels = [task.parse_labels(d) if d is not None else [] for d in drafts]  # None: did not fit

        todo = [i for i, labels in enumerate(draft_labels) if labels]
        confirm = self.bank.search(
            query_embeddings=query[todo], k=cfg.confirm_k,
            same_label=[draft_labels[i] for i in todo], exclude_ids=[self_ids[i] for i in todo],
        ) if todo else []
        challenge = self.bank.search(
            query_embeddings=query[todo], k=cfg.challenge_k,
            exclude_label=[draft_labels[i] for i in todo], exclude_ids=[self_ids[i] for i in todo],
        ) if todo else []
        verify_msgs = [
            prompts.verify_messages(task, examples[i], draft_labels[i], c, x, max_chars)
            for i, c, x in zip(todo, confirm, challenge)
        ]
        sampled = [j for j, i in enumerate(todo) if final[i]]  # the others: verify messages only
        verify = call_model(generate_chat, self.name, "verify", [verify_msgs[j] for j in sampled], cfg,
                            cfg.verify_max_tokens)
        verdicts, verify_ids = [None] * len(todo), [None] * len(todo)
        for k, j in enumerate(sampled):
            verdicts[j], verify_ids[j] = verify.texts[k], prompt_ids_at(verify, k)

        results = []
        verified = dict(zip(todo, range(len(todo))))
        for i in range(len(examples)):
            trace = [trace_entry("draft", draft_msgs[i], drafts[i])]
            if drafts[i] is None:
                results.append(skipped_result("draft", draft_msgs[i], trace))
                continue
            info = {"draft_labels": draft_labels[i], "draft_ids": [h.id for h in draft_hits[i]]}
            if i not in verified:
                material = _material(lambda hits, mc, e=examples[i]: prompts.draft_messages(task, e, hits, mc),
                                     draft_hits[i], max_chars)
                results.append(HarnessResult(draft_msgs[i], drafts[i], "draft_only", trace, info,
                                             prompt_ids_at(draft, i), material))
                continue
            j = verified[i]
            trace.append(trace_entry("verify", verify_msgs[j], verdicts[j]))
            if final[i] and verdicts[j] is None:
                results.append(skipped_result("verify", verify_msgs[j], trace))
                continue
            info["confirm_ids"] = [h.id for h in confirm[j]]
            info["challenge_ids"] = [h.id for h in challenge[j]]
            n = len(confirm[j])
            material = _material(lambda hits, mc, e=examples[i], labels=draft_labels[i], n=n: prompts.verify_messages(
                task, e, labels, hits[:n], hits[n:], mc), confirm[j] + challenge[j], max_chars)
            results.append(HarnessResult(verify_msgs[j], verdicts[j], "full", trace, info, verify_ids[j], material))
        return results

    def _cold_start(self, examples, generate_chat, final) -> list[HarnessResult]:
        msgs = [self.task.student_messages(e) for e in examples]
        sampled = [i for i in range(len(examples)) if final[i]]  # the others: the messages only
        replies = call_model(generate_chat, self.name, "cold_start", [msgs[i] for i in sampled], self.config,
                             self.config.draft_max_tokens)
        texts, ids = [None] * len(msgs), [None] * len(msgs)
        for k, i in enumerate(sampled):
            texts[i], ids[i] = replies.texts[k], prompt_ids_at(replies, k)
        return [  # the student's own prompt: no inserted material
            skipped_result("cold_start", m, [trace_entry("cold_start", m, r)]) if f and r is None
            else HarnessResult(m, r, "cold_start", [trace_entry("cold_start", m, r)], teacher_prompt_ids=i)
            for m, r, i, f in zip(msgs, texts, ids, final)
        ]

    def state_dict(self) -> dict:
        return {"bank": self.bank.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.bank = MemoryBank.from_state_dict(state["bank"])


def _material(build, hits, max_chars) -> TeacherMaterial | None:
    """The retrieved neighbours' texts as the prompt shows them (clipped), and how to
    rebuild the prompt `build(hits, max_chars)` with other texts for them."""
    if not hits:
        return None
    texts = [prompts.clip(h.text, max_chars) for h in hits]
    return TeacherMaterial(texts, lambda t: build([dataclasses.replace(h, text=x) for h, x in zip(hits, t)], None))
