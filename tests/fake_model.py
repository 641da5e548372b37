"""A scripted stand-in for the sampler behind the real chat helper
(`sampling.generate_chat_tokens`): a byte-level tokenizer and a sampler whose answer is
a function of the prompt text. Like the real `Sampler.generate`, it raises on a prompt
longer than its largest prompt bucket, and records the prompts of every call."""

import numpy as np

from ophsd_jax.sampling import SampleOutput, bucket


class ByteTokenizer:
    """Token id = UTF-8 byte + 2 (0: pad, 1: stop); the chat template tags each role."""

    pad_token_id = 0
    stop_token_ids = (1,)

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<assistant>" * add_generation_prompt)
        return self.encode(text)

    def encode(self, text):
        return [b + 2 for b in text.encode()]

    def decode(self, ids):
        return bytes((i - 2) % 256 for i in ids).decode(errors="replace")  # any id (random models) decodes


class ScriptedSampler:
    share = (0, 1)  # one process
    join_calls = True  # GenerateChat joins independent calls (`Sampler`'s default)

    def __init__(self, answer, prompt_buckets=(1 << 20,)):
        self.answer = answer if callable(answer) else (lambda prompt: answer)
        self.prompt_buckets = tuple(prompt_buckets)
        self.calls = []  # the prompts (token ids) of every generate call

    def generate(self, params, prompts, *, max_new_tokens, rng, **kwargs):
        self.calls.append([list(p) for p in prompts])
        for p in prompts:
            bucket(len(p), self.prompt_buckets, "prompt length")  # the real sampler's check
        tok = ByteTokenizer()
        limits = np.broadcast_to(np.asarray(max_new_tokens), (len(prompts),))  # one or one per prompt
        tokens = [tok.encode(self.answer(tok.decode(p)))[:n] for p, n in zip(prompts, limits)]
        return SampleOutput(tokens, np.array([len(t) for t in tokens], np.int32),
                            [np.zeros(len(t), np.float32) for t in tokens])
