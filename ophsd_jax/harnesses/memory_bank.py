"""Online memory bank of labelled examples with exact cosine retrieval.

Entries are (text, labels, id, unit embedding). `search` scores every entry
(exact, no approximate index: banks hold thousands, not millions) and can
restrict the candidates per query:

- `same_label=[labels_q, ...]`: only entries sharing at least one label with
  the query's labels (for single-label tasks: the same class);
- `exclude_label=[labels_q, ...]`: only entries sharing none of them;
- `exclude_ids=[ids_q, ...]`: never return these entries (the query itself,
  when a training example comes round again in a later epoch).

Ties are broken by insertion order, so results are deterministic.
State is plain arrays + JSON (`state_dict` / `save` / `load`), never pickle.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from ophsd_jax.harnesses.embedders import embedder_from_state

_META_FILE = "memory_bank.json"


@dataclasses.dataclass(frozen=True)
class Hit:
    index: int
    score: float
    id: str
    text: str
    labels: tuple[str, ...]


class MemoryBank:
    def __init__(self, embedder):
        self.embedder = embedder
        self.texts: list[str] = []
        self.labels: list[tuple[str, ...]] = []
        self.ids: list[str] = []
        self._embeddings: np.ndarray | None = None  # [N, d] float32, unit rows
        self._label_index: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def embeddings(self) -> np.ndarray | None:
        return self._embeddings

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.embedder.embed(list(texts))

    def add(self, texts, labels, ids=None, embeddings=None) -> None:
        """Append entries; `embeddings` (precomputed, any norm) skips the embedder."""
        texts, labels = list(texts), [tuple(str(x) for x in ls) for ls in labels]
        if len(texts) != len(labels):
            raise ValueError(f"add: {len(texts)} texts but {len(labels)} label lists")
        ids = [str(i) for i in ids] if ids is not None else [f"#{len(self) + i}" for i in range(len(texts))]
        if len(ids) != len(texts):
            raise ValueError(f"add: {len(texts)} texts but {len(ids)} ids")
        if not texts:
            return
        if embeddings is None:
            embeddings = self.embed(texts)
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.shape[0] != len(texts) or embeddings.ndim != 2:
            raise ValueError(f"add: embeddings shape {embeddings.shape} does not match {len(texts)} texts")
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        self._append(texts, labels, ids, embeddings / np.maximum(norms, 1e-12))

    def _append(self, texts, labels, ids, embeddings: np.ndarray) -> None:
        """Store entries whose embeddings are already unit rows (restores are bit-exact)."""
        if self._embeddings is not None and embeddings.shape[1] != self._embeddings.shape[1]:
            raise ValueError(f"add: embedding dim {embeddings.shape[1]} != bank dim {self._embeddings.shape[1]}")
        start = len(self)
        for offset, entry_labels in enumerate(labels):
            for label in set(entry_labels):
                self._label_index.setdefault(label, []).append(start + offset)
        self.texts += texts
        self.labels += labels
        self.ids += ids
        self._embeddings = embeddings if self._embeddings is None else np.concatenate([self._embeddings, embeddings])

    def take_since(self, start: int) -> tuple[list[str], list[tuple[str, ...]], list[str], np.ndarray]:
        """Remove and return the entries from index `start` on: (texts, labels, ids, unit
        embeddings). With `put_back` this re-orders additions (multi-process bank sync)."""
        dim = 0 if self._embeddings is None else self._embeddings.shape[1]
        taken = (self.texts[start:], self.labels[start:], self.ids[start:],
                 np.zeros((0, dim), np.float32) if self._embeddings is None else self._embeddings[start:])
        self.texts, self.labels, self.ids = self.texts[:start], self.labels[:start], self.ids[:start]
        self._embeddings = None if start == 0 or self._embeddings is None else self._embeddings[:start]
        self._label_index = {}
        for i, entry_labels in enumerate(self.labels):
            for label in set(entry_labels):
                self._label_index.setdefault(label, []).append(i)
        return taken

    def put_back(self, texts, labels, ids, embeddings) -> None:
        """Append entries taken (or gathered) from a bank, unchanged: their embeddings are
        already unit rows, so the result is bit-identical to adding them here."""
        if len(texts):
            self._append(list(texts), [tuple(str(x) for x in ls) for ls in labels], [str(i) for i in ids],
                         np.asarray(embeddings, np.float32))

    def _sharing(self, query_labels) -> np.ndarray:
        """Boolean mask of entries sharing at least one of `query_labels`."""
        mask = np.zeros(len(self), dtype=bool)
        for label in set(str(x) for x in query_labels):
            mask[self._label_index.get(label, [])] = True
        return mask

    def search(
        self,
        query_texts=None,
        k: int = 5,
        *,
        query_embeddings=None,
        same_label=None,
        exclude_label=None,
        exclude_ids=None,
    ) -> list[list[Hit]]:
        """Top-`k` entries per query by cosine similarity, best first, with filters."""
        if query_embeddings is None:
            if query_texts is None:
                raise ValueError("search: give query_texts or query_embeddings")
            query_embeddings = self.embed(query_texts)
        queries = np.asarray(query_embeddings, dtype=np.float32)
        queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        n_queries = queries.shape[0]
        for name, per_query in (("same_label", same_label), ("exclude_label", exclude_label),
                                ("exclude_ids", exclude_ids)):
            if per_query is not None and len(per_query) != n_queries:
                raise ValueError(f"search: {name} has {len(per_query)} entries for {n_queries} queries")
        if len(self) == 0 or k <= 0:
            return [[] for _ in range(n_queries)]
        scores = queries @ self._embeddings.T  # [Q, N]
        ids = np.asarray(self.ids)
        results = []
        for q in range(n_queries):
            allowed = np.ones(len(self), dtype=bool)
            if same_label is not None:
                allowed &= self._sharing(same_label[q])
            if exclude_label is not None:
                allowed &= ~self._sharing(exclude_label[q])
            if exclude_ids is not None and exclude_ids[q]:
                allowed &= ~np.isin(ids, list(exclude_ids[q]))
            candidates = np.flatnonzero(allowed)
            # Sort by score descending, then index ascending for ties.
            order = candidates[np.lexsort((candidates, -scores[q, candidates]))][:k]
            results.append([
                Hit(int(i), float(scores[q, i]), self.ids[i], self.texts[i], self.labels[i]) for i in order
            ])
        return results

    def state_dict(self) -> dict:
        """{"config": JSON-able dict, "arrays": {name: ndarray}} — embedder included."""
        embedder_state = self.embedder.state_dict()
        arrays = {f"embedder.{name}": value for name, value in embedder_state["arrays"].items()}
        if self._embeddings is not None:
            arrays["embeddings"] = self._embeddings
        config = {
            "texts": self.texts,
            "labels": [list(x) for x in self.labels],
            "ids": self.ids,
            "embedder": embedder_state["config"],
        }
        return {"config": config, "arrays": arrays}

    @classmethod
    def from_state_dict(cls, state: dict) -> "MemoryBank":
        config, arrays = state["config"], state["arrays"]
        embedder_arrays = {k[len("embedder."):]: v for k, v in arrays.items() if k.startswith("embedder.")}
        bank = cls(embedder_from_state({"config": config["embedder"], "arrays": embedder_arrays}))
        if config["texts"]:
            labels = [tuple(x) for x in config["labels"]]
            bank._append(list(config["texts"]), labels, list(config["ids"]),
                         np.asarray(arrays["embeddings"], dtype=np.float32))
        return bank

    def save(self, directory) -> None:
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        for name, value in state["arrays"].items():
            np.save(directory / f"{name}.npy", np.asarray(value), allow_pickle=False)
        meta = {"config": state["config"], "arrays": sorted(state["arrays"])}
        (directory / _META_FILE).write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, directory) -> "MemoryBank":
        directory = pathlib.Path(directory)
        meta = json.loads((directory / _META_FILE).read_text(encoding="utf-8"))
        arrays = {name: np.load(directory / f"{name}.npy", allow_pickle=False) for name in meta["arrays"]}
        return cls.from_state_dict({"config": meta["config"], "arrays": arrays})
