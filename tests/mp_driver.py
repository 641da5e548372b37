"""`python -m ophsd_jax.train` for tests/test_multiprocess.py, with instruments.

The plan_solve harness is replaced by one that also
- keeps a memory bank (TF-IDF) of every example it observes, synced across processes by
  the trainer like Draft–Verify's bank;
- makes one extra "probe" call after solving whose prompts only process 0 fills (its
  first example; the others pass an empty list): a collective call with zero prompts on
  some processes. The probe's answers are not used, so the loss is unchanged.
At the end each process writes `<workdir>/process_<i>.json`: its share, the number of
prompts it passed to each sampler call, the examples its harness saw, its bank, and the
outputs of `sampler_check`.
"""

import json
import os
import runpy

import jax

from ophsd_jax.harnesses import MemoryBank, PlanSolveHarness, factory, make_embedder
from ophsd_jax.harnesses.base import call_model
from ophsd_jax.run import Run
from ophsd_jax.sampling import Sampler

PROMPTS_PER_CALL = []  # this process's prompt count of every sampler call, in order
CORPUS = ["What is 12 + 7?", "Compute 3 - 9 + 4.", "Find the sum of 25, 31 and 8.", "What is 100 - 58 + 13?",
          "Add 6 and 9, then subtract 2.", "State the result of 41 + 17 - 30."]


class ProbingPlanSolve(PlanSolveHarness):
    def __init__(self, task, config=None):
        super().__init__(task, config)
        self.bank = MemoryBank(make_embedder("tfidf", dim=4).fit(CORPUS))
        self.examples_seen = 0

    def run(self, examples, generate_chat, final=None):
        self.examples_seen += len(examples)
        results = super().run(examples, generate_chat, final)
        probe = [self.task.student_messages(e) for e in examples[:1]] if jax.process_index() == 0 else []
        call_model(generate_chat, self.name, "probe", probe, self.config, 8)
        return results

    def observe(self, examples):
        self.bank.add([self.task.problem_text(e) for e in examples],
                      [[self.task.reference_answer(e)] for e in examples], ids=[e["id"] for e in examples])

    def state_dict(self):
        return {"bank": self.bank.state_dict()}

    def load_state_dict(self, state):
        self.bank = MemoryBank.from_state_dict(state["bank"])


def counting_generate(self, params, prompts, **kw):
    PROMPTS_PER_CALL.append(len(prompts))
    return _generate(self, params, prompts, **kw)


def sampler_check(run):
    """Greedy calls split unevenly over two processes: call 1 all on process 0 (two chunks
    of at most sampler.max_batch / 2 rows; process 1 has none), call 2 one prompt on process
    0 and six on process 1; call 3 repeated prompts (shared prefills), four on process 0 and
    two on process 1. One process takes every prompt."""
    prompts = [[(37 * i + 11 * j) % 900 + 10 for j in range(3 + i % 5)] for i in range(12)]
    calls, on_first = [prompts[:5], prompts[5:], [prompts[3]] * 3 + [prompts[8]] * 3], [5, 1, 4]
    params = jax.jit(lambda p: jax.tree.map(lambda x: x * 8, p))(run.state.params)  # peaked logits: no near-ties
    out = []
    for call, k in zip(calls, on_first):
        mine = call if run.share[1] == 1 else call[:k] if jax.process_index() == 0 else call[k:]
        o = run.sampler.generate(params, mine, max_new_tokens=8, rng=jax.random.key(0), temperature=0.0)
        out.append({"tokens": o.tokens, "logprobs": [lp.tolist() for lp in o.logprobs]})
    return out


def finish(self):
    bank = self.harness.bank
    dump = {"share": list(self.share), "prompts_per_call": list(PROMPTS_PER_CALL),
            "sampler_check": sampler_check(self),
            "harness_examples": self.harness.examples_seen,
            "bank": {"texts": bank.texts, "labels": [list(x) for x in bank.labels], "ids": bank.ids,
                     "embeddings": bank.embeddings.tolist()}}
    with open(os.path.join(self.workdir, f"process_{jax.process_index()}.json"), "w") as f:
        json.dump(dump, f)
    return _finish(self)


_generate, _finish = Sampler.generate, Run.finish
Sampler.generate, Run.finish = counting_generate, finish
factory.HARNESSES["plan_solve"] = ProbingPlanSolve

if __name__ == "__main__":
    runpy.run_module("ophsd_jax.train", run_name="__main__", alter_sys=True)
