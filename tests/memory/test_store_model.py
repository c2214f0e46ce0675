"""Store-backed memory: the exact torch store and flat FAISS give the in-state path's logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from horizonlm.memory.store import MemoryStore, StoreConfig

from ..conftest import make_horizon


def _has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


needs_faiss = pytest.mark.skipif(not _has_faiss(), reason="FAISS backends need faiss-cpu (pip install faiss-cpu)")
"""The FAISS cases skip where faiss-cpu (an optional extra) is absent; the exact torch store always runs."""


@pytest.mark.parametrize("backend", ["torch", pytest.param("faiss_flat", marks=needs_faiss)])
def test_store_backends_match_in_state_memory(backend: str) -> None:
    # The chunk memory: a FIFO store evicts whole entries, as its in-state memory does.
    model = make_horizon(dtype=torch.float32, memory_kind="chunk", memory_query_block=7).eval()  # several blocks per call
    tokens = torch.randint(0, 256, (1, 90), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, _ = model(tokens)
        store = StoreConfig(backend=backend, capacity=model.config.memory_capacity)
        state = model.init_state(1, store_config=store)
        pieces = []
        for start, size in ((0, 17), (17, 40), (57, 33)):
            out, state = model(tokens[:, start : start + size], state)
            pieces.append(out)
    got = torch.cat(pieces, dim=1)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    n = 90 // model.config.chunk_size
    assert n > model.config.memory_capacity  # FIFO eviction happened
    assert state.memory.store.positions.tolist() == list(range(n))[-model.config.memory_capacity :]


def test_stale_store_state_is_refused() -> None:
    model = make_horizon(dtype=torch.float32).eval()
    tokens = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        state = model.init_state(1, store_config=StoreConfig())
        _, later = model(tokens, state)
        with pytest.raises(ValueError, match="stale"):
            model(tokens, state)


@needs_faiss
@pytest.mark.parametrize("backend", ["faiss_flat", "faiss_ivf_flat", "faiss_hnsw"])
def test_faiss_returns_exact_entries_where_exhaustive(backend: str) -> None:
    """Flat is exact; IVF probing every cell and a generous HNSW find the exact top 8 here."""
    g = torch.Generator().manual_seed(0)
    keys = F.normalize(torch.randn(3000, 16, generator=g), dim=-1)
    queries = F.normalize(torch.randn(20, 16, generator=g), dim=-1)
    cfg = StoreConfig(backend=backend, capacity=2000, nlist=8, nprobe=8, hnsw_ef_search=512)
    exact = MemoryStore(16, 4, StoreConfig(capacity=2000))
    approx = MemoryStore(16, 4, cfg)
    for store in (exact, approx):
        store.add(keys[:1500], torch.zeros(1500, 4), torch.arange(1500))
        store.add(keys[1500:], torch.zeros(1500, 4), torch.arange(1500, 3000))
    _, want = exact.search(queries, 8)
    _, got = approx.search(queries, 8)
    assert approx.positions[0].item() == 1000 and len(approx) == 2000
    assert (got.sort(-1).values == want.sort(-1).values).all()


def test_unlimited_store_keeps_every_entry_visible() -> None:
    """A keep-all store equals the in-state memory of a model whose capacity holds everything."""
    model = make_horizon(dtype=torch.float32, memory_capacity=1000).eval()
    tokens = torch.randint(0, 256, (1, 120), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, _ = model(tokens)
        state = model.init_state(1, store_config=StoreConfig(policy="keep_all"))
        a, state = model(tokens[:, :70], state)
        b, _ = model(tokens[:, 70:], state)
    got = torch.cat([a, b], dim=1)
    assert ((got - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.parametrize("span", [1, 3])
def test_induction_memory_in_an_unlimited_store_equals_in_state_memory(span: int) -> None:
    """The induction memory: the pending chunk's entries, invisible, must not crowd the K
    visible ones out of the store's candidates; calls end inside chunks, and a stretch is stepped
    one token at a time (so the store holds pending entries at almost every call). The key
    carried beside the store must give each call's first entry its key, and with a key span the
    carried inputs its filter."""
    model = make_horizon(dtype=torch.float32, memory_capacity=1000, memory_query_block=7,
                         memory_key_span=span).eval()
    tokens = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(2))
    sizes = [13, 30] + [1] * 20 + [37]
    with torch.no_grad():
        want, want_state = model(tokens)
        state = model.init_state(1, store_config=StoreConfig(policy="keep_all"))
        pieces, start = [], 0
        for size in sizes:
            out, state = model(tokens[:, start : start + size], state)
            pieces.append(out)
            start += size
    got = torch.cat(pieces, dim=1)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    assert state.memory.store.positions.tolist() == want_state.memory.chunk_ids.tolist() == [p // 8 for p in range(100)]
    torch.testing.assert_close(state.memory.store.keys, want_state.memory.keys[0], rtol=1e-5, atol=1e-6)
    for field in ("last_key", "tail"):
        carried, want_carried = getattr(state.memory, field), getattr(want_state.memory, field)
        assert (carried is None) == (want_carried is None) == (field == "tail" and span == 1)
        if carried is not None:
            torch.testing.assert_close(carried, want_carried, rtol=1e-5, atol=1e-6)


def test_induction_memory_refuses_a_fifo_store() -> None:
    model = make_horizon(dtype=torch.float32).eval()
    state = model.init_state(1, store_config=StoreConfig(capacity=model.config.memory_capacity))
    with torch.no_grad(), pytest.raises(ValueError, match="never evicts"):
        model(torch.randint(0, 256, (1, 20)), state)
