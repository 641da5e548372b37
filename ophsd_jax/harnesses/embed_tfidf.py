"""Character n-gram TF-IDF + truncated SVD embedder (the default).

Character n-grams need no tokenizer, so the same embedder works for Chinese
case facts (no spaces between words) and SMILES strings (where substrings
such as `C(=O)O` or `[N+](=O)[O-]` are the chemistry). The SVD turns the
sparse TF-IDF vectors into short dense ones; cosine similarity over them is
LSA-style retrieval.

The fitted state is three plain things: the n-gram vocabulary (JSON list),
the IDF weights and the SVD components (arrays), so it is saved without
pickle and restored to give bit-identical embeddings.
"""

from __future__ import annotations

import numpy as np


# Up to this many texts the SVD goes through the small [n, n] Gram matrix.
_GRAM_LIMIT = 3000


def _svd_components_from_gram(tfidf, n_components: int) -> np.ndarray:
    """Top right-singular vectors of a sparse [n, F] matrix with n small.

    Randomized SVD orthogonalises [F, k] blocks (F = vocabulary size) many
    times; with n << F it is far cheaper, and exact, to eigendecompose
    X X^T = U S^2 U^T ([n, n]) and map back: V^T = S^-1 U^T X.
    """
    gram = (tfidf @ tfidf.T).toarray().astype(np.float64)
    eigvals, eigvecs = np.linalg.eigh(gram)  # ascending
    order = np.argsort(eigvals)[::-1][:n_components]
    eigvals, eigvecs = eigvals[order], eigvecs[:, order]
    keep = eigvals > 1e-10 * max(eigvals[0], 1e-30)  # drop null directions
    eigvals, eigvecs = eigvals[keep], eigvecs[:, keep]
    components = np.asarray((tfidf.T @ eigvecs).T) / np.sqrt(eigvals)[:, None]
    # Fix the sign ambiguity of eigenvectors: largest-magnitude entry positive.
    signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
    return components * signs[:, None]


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


class TfidfSvdEmbedder:
    kind = "tfidf"

    def __init__(
        self,
        dim: int = 128,
        ngram_min: int = 1,
        ngram_max: int = 3,
        max_features: int = 20_000,
        seed: int = 0,
    ):
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"bad n-gram range ({ngram_min}, {ngram_max})")
        self.dim = int(dim)
        self.ngram_min = int(ngram_min)
        self.ngram_max = int(ngram_max)
        self.max_features = int(max_features)
        self.seed = int(seed)
        self._vectorizer = None
        self._components = None  # [dim, vocab] float32

    @property
    def fitted(self) -> bool:
        return self._components is not None

    @property
    def output_dim(self) -> int | None:
        return None if self._components is None else int(self._components.shape[0])

    def _new_vectorizer(self, vocabulary=None):
        from sklearn.feature_extraction.text import TfidfVectorizer  # lazy: ~0.1 GB, only for retrieval harnesses

        # Case matters in SMILES (aromatic c vs aliphatic C), so no lowercasing.
        return TfidfVectorizer(
            analyzer="char",
            ngram_range=(self.ngram_min, self.ngram_max),
            max_features=None if vocabulary is not None else self.max_features,
            sublinear_tf=True,
            lowercase=False,
            vocabulary=vocabulary,
        )

    def fit(self, texts: list[str]) -> "TfidfSvdEmbedder":
        texts = list(texts)
        if len(texts) < 2:
            raise ValueError(f"TfidfSvdEmbedder.fit needs at least 2 texts, got {len(texts)}")
        vectorizer = self._new_vectorizer()
        tfidf = vectorizer.fit_transform(texts)
        # Few texts cap the rank; TruncatedSVD also needs n_components < n_features.
        n_components = min(self.dim, tfidf.shape[0] - 1, tfidf.shape[1] - 1)
        if n_components < 1:
            raise ValueError("TfidfSvdEmbedder.fit: texts too short to build any feature")
        if tfidf.shape[0] <= _GRAM_LIMIT:
            components = _svd_components_from_gram(tfidf, n_components)
        else:
            from sklearn.decomposition import TruncatedSVD

            svd = TruncatedSVD(n_components=n_components, random_state=self.seed).fit(tfidf)
            components = svd.components_
        self._vectorizer = vectorizer
        self._components = np.asarray(components, dtype=np.float32)
        return self

    def embed(self, texts: list[str]) -> np.ndarray:
        """[len(texts), output_dim] float32, unit rows (all-zero for unknown text)."""
        if not self.fitted:
            raise RuntimeError("TfidfSvdEmbedder is not fitted: call fit(texts) first")
        texts = list(texts)
        if not texts:  # a process with no examples in a multi-process run (sklearn refuses 0 rows)
            return np.zeros((0, self.output_dim), np.float32)
        tfidf = self._vectorizer.transform(texts).astype(np.float32)
        return l2_normalize(np.asarray(tfidf @ self._components.T))

    def state_dict(self) -> dict:
        config = {
            "kind": self.kind,
            "dim": self.dim,
            "ngram_min": self.ngram_min,
            "ngram_max": self.ngram_max,
            "max_features": self.max_features,
            "seed": self.seed,
        }
        if not self.fitted:
            return {"config": config, "arrays": {}}
        vocab = self._vectorizer.vocabulary_
        config["vocabulary"] = sorted(vocab, key=vocab.__getitem__)
        arrays = {"idf": np.asarray(self._vectorizer.idf_), "components": self._components}
        return {"config": config, "arrays": arrays}

    @classmethod
    def from_state_dict(cls, state: dict) -> "TfidfSvdEmbedder":
        config = dict(state["config"])
        config.pop("kind", None)
        vocabulary = config.pop("vocabulary", None)
        embedder = cls(**config)
        if vocabulary is not None:
            vectorizer = embedder._new_vectorizer({term: i for i, term in enumerate(vocabulary)})
            vectorizer.idf_ = np.asarray(state["arrays"]["idf"])
            embedder._vectorizer = vectorizer
            embedder._components = np.asarray(state["arrays"]["components"], dtype=np.float32)
        return embedder
