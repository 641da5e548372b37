"""Tokenizer + chat template, from a Hugging Face folder (local files only) or GGUF metadata.

Wraps the `tokenizers` library and renders the model's own Jinja chat template the
way transformers does (sandboxed, trim_blocks/lstrip_blocks), so prompts match what
the model was trained on without importing transformers at run time.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

# Common end-of-turn markers treated as stop tokens when present in the vocabulary.
END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>")


class TokenizerError(ValueError):
    pass


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _compile_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


class Tokenizer:
    def __init__(self, tok: HFTokenizer, chat_template: str | None, *, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None):
        self.tok = tok
        self.chat_template = chat_template
        self._template = _compile_template(chat_template) if chat_template else None
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token = pad_token or eos_token

    # ---- construction ----------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str) -> "Tokenizer":
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tj):
            raise TokenizerError(f"{path!r} has no tokenizer.json (only fast tokenizers are supported)")
        tok = HFTokenizer.from_file(tj)
        conf = {}
        conf_path = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(conf_path):
            with open(conf_path) as f:
                conf = json.load(f)
        template = conf.get("chat_template")
        jinja_path = os.path.join(path, "chat_template.jinja")
        if os.path.exists(jinja_path):  # transformers >= 4.43 may store it beside the config
            with open(jinja_path) as f:
                template = f.read()
        if isinstance(template, list):  # named templates: take the default
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        token = lambda k: conf.get(k)["content"] if isinstance(conf.get(k), dict) else conf.get(k)  # noqa: E731
        return cls(tok, template, bos_token=token("bos_token"), eos_token=token("eos_token"), pad_token=token("pad_token"))

    @classmethod
    def from_gguf_fields(cls, fields: dict[str, Any]) -> "Tokenizer":
        """GPT-2 style byte-level BPE from llama.cpp metadata (`tokenizer.ggml.*`)."""
        if fields.get("tokenizer.ggml.model") != "gpt2":
            raise TokenizerError(f"unsupported GGUF tokenizer model {fields.get('tokenizer.ggml.model')!r}")
        tokens = fields["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
        types = fields["tokenizer.ggml.token_type"]
        tok = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
        pre = fields.get("tokenizer.ggml.pre", "default")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
        if pre in ("smollm", "starcoder", "refact", "codeshell"):
            # llama.cpp's pre-tokenizer for these splits every digit, then the GPT-2 regex.
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif pre in ("default", "gpt2"):
            tok.pre_tokenizer = byte_level
        else:
            raise TokenizerError(f"unsupported GGUF pre-tokenizer {pre!r}")
        tok.decoder = decoders.ByteLevel()
        # token_type 3 = control tokens (<|im_start|>, <|im_end|>, ...): never split, skipped on decode.
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
        name = lambda key: tokens[fields[key]] if key in fields else None  # noqa: E731
        return cls(tok, fields.get("tokenizer.chat_template"), bos_token=name("tokenizer.ggml.bos_token_id"),
                   eos_token=name("tokenizer.ggml.eos_token_id"), pad_token=name("tokenizer.ggml.padding_token_id"))

    # ---- ids ---------------------------------------------------------------------------

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self):
        return self.token_id(self.bos_token)

    @property
    def eos_token_id(self):
        return self.token_id(self.eos_token)

    @property
    def pad_token_id(self) -> int:
        pid = self.token_id(self.pad_token)
        return 0 if pid is None else pid

    @property
    def stop_token_ids(self) -> list[int]:
        """EOS plus end-of-turn markers the vocabulary has: where generation stops."""
        ids = [self.eos_token_id] + [self.token_id(t) for t in END_OF_TURN]
        return sorted({i for i in ids if i is not None})

    # ---- text ------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        if self._template is None:
            raise TokenizerError("this tokenizer has no chat template")
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = True,
                            **kwargs):
        """Render with the model's template; kwargs (e.g. enable_thinking) go to the template."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text) if tokenize else text

    # ---- export ----------------------------------------------------------------------

    def save(self, out_dir: str) -> None:
        os.makedirs(out_dir, exist_ok=True)
        self.tok.save(os.path.join(out_dir, "tokenizer.json"))
        conf = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                "eos_token": self.eos_token, "pad_token": self.pad_token, "clean_up_tokenization_spaces": False,
                "model_max_length": 1 << 20}
        if self.chat_template:
            conf["chat_template"] = self.chat_template
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(conf, f, indent=2, ensure_ascii=False)
