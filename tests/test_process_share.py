"""Helpers that let each process handle only its share of a batch, checked in one
process (tests/test_multiprocess.py runs the real two-process program)."""

import types

import jax
import numpy as np
import pytest

from ophsd_jax import parallel
from ophsd_jax.data.iterator import ExampleIterator
from ophsd_jax.distill.batch import Buckets, build_pair_batch
from ophsd_jax.harnesses.embed_tfidf import TfidfSvdEmbedder
from ophsd_jax.harnesses.memory_bank import MemoryBank
from ophsd_jax.run import _pad_lengths


def test_share_slices_are_contiguous_blocks_covering_everything():
    for n in range(0, 12):
        for count in (1, 2, 3, 4):
            blocks = [parallel.share_slice(n, (i, count)) for i in range(count)]
            assert [i for b in blocks for i in range(n)[b]] == list(range(n))
            assert max(b.stop - b.start for b in blocks) - min(b.stop - b.start for b in blocks) <= 1
    assert parallel.share_slice(8, (1, 2)) == slice(4, 8)


def test_iterator_shares_split_each_batch_and_keep_a_global_position():
    source = [{"id": i} for i in range(10)]
    whole = ExampleIterator(source, 4, seed=3)
    parts = [ExampleIterator(source, 4, seed=3, share=(i, 2)) for i in range(2)]
    for _ in range(5):  # crosses an epoch boundary
        batch = next(whole)
        halves = [next(p) for p in parts]
        assert halves[0] + halves[1] == batch and len(halves[0]) == 2
        assert parts[0].state() == parts[1].state() == whole.state()


def test_pad_lengths_equals_building_with_the_agreed_buckets():
    class CharTokenizer:
        pad_token_id = 3

        def apply_chat_template(self, messages, add_generation_prompt=True):
            return [ord(c) for m in messages for c in f"[{m['role']}]{m['content']}|"]

    tok = CharTokenizer()
    students = [[{"role": "user", "content": "2+2?"}], [{"role": "user", "content": "hi"}]]
    teachers = [[{"role": "user", "content": "2+2? plan: add"}], [{"role": "user", "content": "hi!"}]]
    responses = [[52, 10], [104, 105, 33]]
    small = build_pair_batch(tok, students, teachers, responses, buckets=[16, 32, 64, 128], batch_size=3)
    assert small.student.tokens.shape[1] == 16 and small.resp_tokens.shape[1] == 16
    agreed = Buckets(student=(64,), teacher=(128,), response=(32,))
    big = build_pair_batch(tok, students, teachers, responses, buckets=agreed, batch_size=3)
    padded = _pad_lengths(small, 64, 128, 32, pad_id=tok.pad_token_id)
    for a, b in zip(jax.tree.leaves(padded), jax.tree.leaves(big)):
        np.testing.assert_array_equal(a, b)


def test_bank_gathered_from_shares_equals_one_bank():
    texts = [f"case {i}: {'abc' * (i % 3)} reaction {i * 7}" for i in range(12)]
    labels = [[f"class{i % 4}"] for i in range(12)]
    ids = [f"x{i}" for i in range(12)]
    embedder = TfidfSvdEmbedder(dim=6).fit(texts)
    one = MemoryBank(embedder)
    one.add(texts[:4], labels[:4], ids[:4])
    one.add(texts[4:], labels[4:], ids[4:])
    # Two "processes" with the same first step, each observing its half of the second
    # step, then merging the additions in share order (what Run.observe does).
    banks = [MemoryBank(embedder) for _ in range(2)]
    for b in banks:
        b.add(texts[:4], labels[:4], ids[:4])
    for b, part in zip(banks, (slice(4, 8), slice(8, 12))):
        b.add(texts[part], labels[part], ids[part])
    added = [b.take_since(4) for b in banks]
    for b in banks:
        assert len(b) == 4
        for entries in added:
            b.put_back(*entries)
        assert (b.texts, b.labels, b.ids) == (one.texts, one.labels, one.ids)
        np.testing.assert_array_equal(b.embeddings, one.embeddings)
        q = embedder.embed(texts[:3])
        assert b.search(query_embeddings=q, k=3, same_label=labels[:3]) == \
            one.search(query_embeddings=q, k=3, same_label=labels[:3])


def test_one_process_is_one_share_and_gathers_are_identities():
    mesh = parallel.make_mesh(1, -1, 1)
    assert parallel.batch_share(mesh) == (0, 1)
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    assert len(parallel.allgather_rows(x)) == 1 and parallel.allgather_rows(x)[0] is x
    assert parallel.allgather_json({"a": [1.5, float("nan")]})[0]["a"][0] == 1.5
    assert parallel.agree_max([3, 7]) == [3, 7]
    sh = parallel.named_sharding(mesh, ("batch", None), (8, 2))
    rows = np.arange(16, dtype=np.int32).reshape(8, 2)
    g = parallel.from_process_rows(rows, sh, (0, 1))
    assert parallel.global_array(g, sh) is g  # already placed: passes through
    np.testing.assert_array_equal(parallel.process_rows(g, (0, 1)), rows)


def test_batch_rows_replicated_across_processes_fall_back_to_one_share(monkeypatch):
    # Pretend there are two processes while every device belongs to process 0: no process
    # holds a block of its own, so every process must handle the whole batch.
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert parallel.batch_share(parallel.make_mesh(1, -1, 1)) == (0, 1)
    assert parallel.batch_share(parallel.make_mesh(1, 1, -1)) == (0, 1)


def fake_devices(procs):
    return [types.SimpleNamespace(id=i, process_index=p, platform="cpu", device_kind="cpu") for i, p in enumerate(procs)]


def test_mesh_goes_process_by_process_keeping_local_order():
    devs = fake_devices([i % 2 for i in range(8)])  # interleaved processes
    arr = parallel.device_grid((1, 4, 2), devs)
    assert [d.process_index for d in arr.flat] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [d.id for d in arr.flat] == [0, 2, 4, 6, 1, 3, 5, 7]  # local order kept (CPU: given order)
    arr = parallel.device_grid((2, 2, 2), devs)  # data=2: one data row per process
    assert [[d.process_index for d in row.flat] for row in arr] == [[0] * 4, [1] * 4]


def test_processes_that_cannot_take_blocks_go_in_process_order():
    devs = fake_devices([2, 0, 1, 0, 1, 2])
    assert parallel.process_blocks((2, 3, 1), 3) is None  # 3 processes, data=2 x fsdp=3
    arr = parallel.device_grid((2, 3, 1), devs)
    assert [d.id for d in arr.flat] == [1, 3, 2, 4, 0, 5]
    assert parallel.process_blocks((2, 4, 1), 4) == [2, 2, 1]
    assert parallel.process_blocks((1, 8, 2), 16) == [1, 8, 2]


def test_run_refuses_a_batch_that_does_not_split_evenly(monkeypatch, tmp_path):
    import importlib.util
    import os

    from ophsd_jax.run import Run

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")
    spec = importlib.util.spec_from_file_location("tiny", path)
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    monkeypatch.setattr(parallel, "batch_share", lambda mesh: (1, 3))  # as if 3 processes
    c = tiny.get_config()
    c.train.batch_size = 4
    with pytest.raises(ValueError, match="batch_size=4 must be divisible by the number of processes"):
        Run.create(c, str(tmp_path))
