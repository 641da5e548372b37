"""Embedder registry: build by name, rebuild from a saved state.

An embedder has `kind`, `fitted`, `output_dim`, `fit(texts)`,
`embed(texts) -> [n, d] float32 unit rows`, `state_dict()` (JSON config +
numpy arrays) and `from_state_dict(state)`.
"""

from __future__ import annotations

from ophsd_jax.harnesses.embed_minilm import MiniLMEmbedder
from ophsd_jax.harnesses.embed_tfidf import TfidfSvdEmbedder

EMBEDDERS = {TfidfSvdEmbedder.kind: TfidfSvdEmbedder, MiniLMEmbedder.kind: MiniLMEmbedder}


def make_embedder(kind: str = "tfidf", **options):
    if kind not in EMBEDDERS:
        raise ValueError(f"unknown embedder {kind!r}; choose from {sorted(EMBEDDERS)}")
    try:
        return EMBEDDERS[kind](**options)
    except TypeError as e:
        raise ValueError(f"bad options for embedder {kind!r}: {e}") from None


def embedder_from_state(state: dict):
    kind = state["config"].get("kind")
    if kind not in EMBEDDERS:
        raise ValueError(f"saved embedder has unknown kind {kind!r}")
    return EMBEDDERS[kind].from_state_dict(state)
