"""Memory bank: retrieval equals brute-force cosine search; save/load is exact; retrieval is useful."""

import numpy as np
import pytest

import tolerances as tol
from ophsd_jax.data.load_lawbench import load_lawbench
from ophsd_jax.data.load_uspto import load_uspto_csv
from ophsd_jax.data.tasks import make_task
from ophsd_jax.harnesses.embed_tfidf import TfidfSvdEmbedder
from ophsd_jax.harnesses.embedders import embedder_from_state, make_embedder
from ophsd_jax.harnesses.memory_bank import MemoryBank


class FixedEmbedder:
    """Embeds by lookup, so the test controls every vector."""

    kind = "fixed"
    fitted = True

    def __init__(self, table):
        self.table = table

    def embed(self, texts):
        return np.stack([self.table[t] for t in texts])


def brute_force(bank_vecs, bank_labels, bank_ids, query, k, same=None, exclude=None, exclude_ids=()):
    """Reference: cosine of every entry in float64, filter, sort by (-score, index)."""
    rows = []
    q = query / np.linalg.norm(query)
    for i, (v, labels, id_) in enumerate(zip(bank_vecs, bank_labels, bank_ids)):
        if same is not None and not set(labels) & set(same):
            continue
        if exclude is not None and set(labels) & set(exclude):
            continue
        if id_ in exclude_ids:
            continue
        rows.append((-float(np.dot(v / np.linalg.norm(v), q)), i))
    return [i for _, i in sorted(rows)[:k]]


@pytest.fixture
def random_bank():
    rng = np.random.default_rng(0)
    n, d = 300, 16
    vecs = rng.normal(size=(n, d))
    label_pool = ["a", "b", "c", "d", "e"]
    labels = [list(rng.choice(label_pool, size=rng.integers(1, 3), replace=False)) for _ in range(n)]
    ids = [f"x{i}" for i in range(n)]
    texts = [f"t{i}" for i in range(n)]
    bank = MemoryBank(FixedEmbedder(dict(zip(texts, vecs))))
    # Added in three chunks, as an online bank grows; the middle one with precomputed vectors.
    bank.add(texts[:100], labels[:100], ids[:100])
    bank.add(texts[100:200], labels[100:200], ids[100:200], embeddings=vecs[100:200] * 3.0)
    bank.add(texts[200:], labels[200:], ids[200:])
    return bank, vecs, labels, ids, rng


def test_search_equals_brute_force_with_filters(random_bank):
    bank, vecs, labels, ids, rng = random_bank
    queries = rng.normal(size=(20, vecs.shape[1]))
    filters = [
        {},
        {"same": lambda q: ["a"]},
        {"same": lambda q: ["b", "e"]},
        {"exclude": lambda q: ["a", "c"]},
        {"same": lambda q: ["d"], "exclude_ids": lambda q: [ids[q * 7]]},
    ]
    for f in filters:
        same = [f["same"](q) for q in range(20)] if "same" in f else None
        exclude = [f["exclude"](q) for q in range(20)] if "exclude" in f else None
        ex_ids = [f["exclude_ids"](q) for q in range(20)] if "exclude_ids" in f else None
        hits = bank.search(query_embeddings=queries, k=7, same_label=same, exclude_label=exclude, exclude_ids=ex_ids)
        for q in range(20):
            expected = brute_force(vecs, labels, ids, queries[q], 7,
                                   same[q] if same else None, exclude[q] if exclude else None,
                                   ex_ids[q] if ex_ids else ())
            assert [h.index for h in hits[q]] == expected
            for h in hits[q]:
                ref = np.dot(vecs[h.index], queries[q]) / np.linalg.norm(vecs[h.index]) / np.linalg.norm(queries[q])
                # fp32 against float64: both vectors stored in fp32 and normalised (a d-term sum of
                # squares, sqrt, division), then a d-term dot product of unit vectors
                assert h.score == pytest.approx(ref, abs=tol.gamma(3 * vecs.shape[1] + 6))
                assert h.id == ids[h.index] and list(h.labels) == labels[h.index]


def test_filters_mean_share_one_label_or_none(random_bank):
    bank, vecs, labels, ids, rng = random_bank
    q = rng.normal(size=(1, vecs.shape[1]))
    same = bank.search(query_embeddings=q, k=300, same_label=[["a", "b"]])[0]
    other = bank.search(query_embeddings=q, k=300, exclude_label=[["a", "b"]])[0]
    assert all({"a", "b"} & set(h.labels) for h in same)
    assert all(not {"a", "b"} & set(h.labels) for h in other)
    assert len(same) + len(other) == len(bank)  # the two filters partition the bank


def test_search_edge_cases(random_bank):
    bank, vecs, *_ = random_bank
    empty = MemoryBank(FixedEmbedder({}))
    assert empty.search(query_embeddings=np.ones((2, 4)), k=3) == [[], []]
    assert bank.search(query_embeddings=np.ones((1, vecs.shape[1])), k=0) == [[]]
    none_match = bank.search(query_embeddings=np.ones((1, vecs.shape[1])), k=5, same_label=[["zzz"]])
    assert none_match == [[]]
    with pytest.raises(ValueError, match="same_label"):
        bank.search(query_embeddings=np.ones((2, vecs.shape[1])), k=5, same_label=[["a"]])
    with pytest.raises(ValueError, match="dim"):
        bank.add(["new"], [["a"]], embeddings=np.ones((1, 3)))


def test_ties_break_by_insertion_order():
    table = {"p": np.array([1.0, 0.0]), "q": np.array([1.0, 0.0]), "r": np.array([0.0, 1.0])}
    bank = MemoryBank(FixedEmbedder(table))
    bank.add(["r", "q", "p"], [["x"], ["x"], ["x"]])
    assert [h.text for h in bank.search(["p"], k=3)[0]] == ["q", "p", "r"]


def test_tfidf_bank_save_load_identical(tmp_path):
    texts = ["被告人盗窃手机一部", "被告人诈骗钱款五万元", "醉酒驾驶机动车", "持刀抢劫便利店", "盗窃电动车一辆",
             "CC(=O)O.OCC>>CC(=O)OCC", "c1ccccc1Br.OB(O)c1ccccc1>>c1ccc(-c2ccccc2)cc1"]
    labels = [["盗窃"], ["诈骗"], ["危险驾驶"], ["抢劫"], ["盗窃"], ["2"], ["3"]]
    bank = MemoryBank(TfidfSvdEmbedder(dim=4).fit(texts))
    bank.add(texts, labels, ids=[f"id{i}" for i in range(len(texts))])
    bank.save(tmp_path / "bank")
    assert not list((tmp_path / "bank").glob("*.pkl"))
    loaded = MemoryBank.load(tmp_path / "bank")
    assert loaded.texts == bank.texts and loaded.labels == bank.labels and loaded.ids == bank.ids
    np.testing.assert_array_equal(loaded.embeddings, bank.embeddings)
    queries = ["盗窃手机", "酒后驾车", "OB(O)c1ccccc1"]
    np.testing.assert_array_equal(loaded.embed(queries), bank.embed(queries))
    for a, b in zip(loaded.search(queries, k=3, exclude_label=[["盗窃"]] * 3), bank.search(queries, k=3, exclude_label=[["盗窃"]] * 3)):
        assert a == b
    # state_dict round trip without files too.
    again = MemoryBank.from_state_dict(bank.state_dict())
    np.testing.assert_array_equal(again.embeddings, bank.embeddings)


def test_tfidf_embedder_state_roundtrip_and_errors():
    emb = make_embedder("tfidf", dim=3, ngram_min=1, ngram_max=2)
    with pytest.raises(RuntimeError, match="not fitted"):
        emb.embed(["x"])
    with pytest.raises(ValueError, match="at least 2"):
        emb.fit(["only one"])
    emb.fit(["abc abd", "bcd xyz", "hello world", "abc xyz"])
    restored = embedder_from_state(emb.state_dict())
    np.testing.assert_array_equal(restored.embed(["abc", "zzz qq"]), emb.embed(["abc", "zzz qq"]))
    out = emb.embed(["abc", "!!!"])
    assert out.dtype == np.float32 and out.shape == (2, 3)
    # normalised in fp32 (a 3-term sum of squares, sqrt, division), measured again by numpy
    assert np.linalg.norm(out[0]) == pytest.approx(1.0, abs=tol.gamma(2 * (3 + 2)))
    assert np.all(out[1] == 0)  # nothing in the vocabulary: a zero vector, not NaN
    with pytest.raises(ValueError, match="unknown embedder"):
        make_embedder("word2vec")


def test_tfidf_gram_svd_matches_sklearn_subspace():
    # The Gram-matrix SVD path must give the same retrieval geometry as sklearn's SVD:
    # same singular subspace, hence the same pairwise cosines up to float error.
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    rng = np.random.default_rng(0)
    alphabet = list("abcdefghij")
    texts = ["".join(rng.choice(alphabet, size=30)) for _ in range(40)]
    emb = TfidfSvdEmbedder(dim=39, ngram_min=1, ngram_max=2).fit(texts)
    ours = emb.embed(texts)
    vec = TfidfVectorizer(analyzer="char", ngram_range=(1, 2), sublinear_tf=True, lowercase=False)
    x = vec.fit_transform(texts)
    ref = TruncatedSVD(39, algorithm="arpack").fit_transform(x)
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    # Both subspaces are float64 SVDs (a difference of order 1e-16 / spectral gap); ours then
    # projects in fp32: e = x C^T with x and C rounded to fp32 and each entry a sum over the
    # text's n-grams, off by at most gamma(nnz + 2) (|x| @ |C|^T) per entry. Normalising
    # doubles the relative error ||de|| / ||e||, and a cosine of two rows adds both and the
    # dim-term dot product.
    xs = emb._vectorizer.transform(texts)
    comps = emb._components.astype(np.float64)
    e = np.asarray(xs @ comps.T)
    abs_e = np.asarray(abs(xs) @ np.abs(comps).T)
    nnz = int(np.diff(xs.indptr).max())
    rel = 2 * tol.gamma(nnz + 2) * np.linalg.norm(abs_e, axis=1) / np.linalg.norm(e, axis=1)
    atol = rel[:, None] + rel[None, :] + tol.gamma(emb.output_dim)
    assert np.all(np.abs(ours @ ours.T - ref @ ref.T) <= atol)


def precision_at_5(task, bank_examples, query_examples):
    texts = [task.case_text(e) for e in bank_examples]
    embedder = make_embedder("tfidf", **task.embedder_options).fit(texts)
    bank = MemoryBank(embedder)
    bank.add(texts, [task.label(e) for e in bank_examples], ids=[e["id"] for e in bank_examples])
    hits = bank.search([task.case_text(e) for e in query_examples], k=5)
    retrieved = np.mean([
        np.mean([bool(set(h.labels) & set(task.label(e))) for h in hs]) for hs, e in zip(hits, query_examples)
    ])
    # Random neighbours: the exact expected precision of picking bank entries uniformly.
    random = np.mean([
        np.mean([bool(set(task.label(b)) & set(task.label(e))) for b in bank_examples]) for e in query_examples
    ])
    return float(retrieved), float(random)


def test_lawbench_retrieval_beats_random(shared_data):
    examples, _ = load_lawbench(shared_data / "lawbench" / "3-3_zero_shot.json")
    retrieved, random = precision_at_5(make_task("lawbench"), examples[:400], examples[400:])
    print(f"\nLawBench 3-3 precision@5 (share >= 1 accusation): tfidf {retrieved:.3f}  random {random:.3f}")
    assert retrieved >= random + 0.15 and retrieved >= 5 * random


def test_uspto_retrieval_beats_random(shared_data):
    examples, _ = load_uspto_csv(shared_data / "uspto" / "schneider_dataSetA.csv")
    order = np.random.default_rng(0).permutation(len(examples))
    examples = [examples[i] for i in order]
    retrieved, random = precision_at_5(make_task("uspto"), examples[:546], examples[546:])
    print(f"\nUSPTO precision@5 (same class): tfidf {retrieved:.3f}  random {random:.3f}")
    assert retrieved >= random + 0.12 and retrieved >= 1.8 * random


def test_minilm_matches_transformers_reference():
    """Our numpy BERT forward vs Hugging Face BertModel (CPU torch) on the packaged weights."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from ophsd_jax.harnesses.embed_minilm import MiniLMEmbedder, locate_model_dir

    texts = ["A man is eating food.", "The cat sat on the mat, watching the birds outside.", "盗窃手机",
             "CC(=O)O.OCC>>CC(=O)OCC"]
    ours = MiniLMEmbedder(batch_size=3).embed(texts)
    model_dir = str(locate_model_dir())
    model = transformers.BertModel.from_pretrained(model_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    # Two fp32 BERT forwards: per layer the q/k/v projections (D), scores (head dim), softmax
    # and average (T each), output projection (D), two LayerNorms (2D each: mean, variance) and
    # the feed-forward (D, then F); then the mean pooling (T) and the normalisation (D). The
    # LayerNorms keep activations at unit scale, so the errors are relative to the unit-norm
    # output.
    cfg = model.config
    d, f, t = cfg.hidden_size, cfg.intermediate_size, batch["input_ids"].shape[1]
    dh = d // cfg.num_attention_heads
    n = cfg.num_hidden_layers * (d + dh + 2 * t + d + 4 * d + d + f) + t + d
    np.testing.assert_allclose(ours, ref, rtol=0, atol=tol.pair(tol.prob(n)))
    # Paraphrases are closer than unrelated sentences.
    e = MiniLMEmbedder().embed(["How old are you?", "What is your age?", "The stock market fell today."])
    assert e[0] @ e[1] > e[0] @ e[2] + 0.3
