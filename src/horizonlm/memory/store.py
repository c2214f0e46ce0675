"""Memory stores: one interface, an exact torch backend and FAISS backends, for memories that
grow to millions of entries and outlive a process.

A store holds unit-norm keys, values and the stream position (chunk index) of every entry,
oldest first. ``capacity`` with the ``fifo`` policy drops the oldest entries; ``keep_all`` never
drops (saved contexts). Search is maximum inner product, top-k.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from horizonlm.errors import HorizonError
from horizonlm.ops.topk_search import exact_topk

BACKENDS = ("torch", "faiss_flat", "faiss_ivf_flat", "faiss_ivf_pq", "faiss_hnsw")


@dataclass
class StoreConfig:
    """Which backend a memory store uses and how it is shaped."""

    backend: str = "torch"
    """torch (exact), faiss_flat (exact), faiss_ivf_flat, faiss_ivf_pq or faiss_hnsw."""
    capacity: int = 0
    """Entries kept (0: unlimited)."""
    policy: str = "fifo"
    """fifo (drop the oldest beyond capacity) or keep_all (refuse to grow past capacity)."""
    nlist: int = 1024
    """IVF: number of coarse cells."""
    nprobe: int = 32
    """IVF: cells visited per query."""
    pq_m: int = 32
    """IVF-PQ: sub-quantisers (bytes per entry in the code)."""
    hnsw_m: int = 32
    """HNSW: links per node."""
    hnsw_ef_search: int = 128
    """HNSW: search breadth."""
    key_block: int = 1 << 20
    """torch: keys scored at once (bounds the score matrix at queries x key_block)."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.policy not in ("fifo", "keep_all"):
            raise ValueError(f"policy must be fifo or keep_all, got {self.policy!r}")
        for name in ("nlist", "nprobe", "pq_m", "hnsw_m", "hnsw_ef_search", "key_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {self.capacity}")


class MemoryStore:
    """Append-only entries (keys, values, positions) with top-k search.

    Entries live in float32 torch tensors on ``device``: values and positions always, keys too
    except for IVF indexes, which hold their own (compressed) copy and remove entries by id. ``first_id`` counts entries
    dropped by FIFO eviction, so an index returned by :meth:`search` is a stable entry id.
    """

    def __init__(self, key_dim: int, value_dim: int, config: StoreConfig | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.config = config or StoreConfig()
        self.key_dim, self.value_dim = key_dim, value_dim
        self.device = torch.device(device)
        self.keys = torch.zeros(0, key_dim, device=self.device)  # (M, Dk)
        self.values = torch.zeros(0, value_dim, device=self.device)  # (M, Dv)
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)  # (M,)
        self.first_id = 0
        self.index_base = 0
        """Global entry id of FAISS id 0 (flat and HNSW indexes are rebuilt on eviction)."""
        self.index = None if self.config.backend == "torch" else self._new_index()

    def __len__(self) -> int:
        return self.positions.shape[0]

    @property
    def keeps_keys(self) -> bool:
        """IVF indexes keep (compressed) keys themselves and remove by id: no second copy."""
        return self.config.backend not in ("faiss_ivf_flat", "faiss_ivf_pq")

    # -- FAISS ---------------------------------------------------------------------------
    def _new_index(self):
        try:
            import faiss
        except ImportError as err:
            raise HorizonError("FAISS backends need faiss-cpu: pip install faiss-cpu") from err
        cfg, d = self.config, self.key_dim
        if cfg.backend == "faiss_flat":
            return faiss.IndexFlatIP(d)
        if cfg.backend == "faiss_hnsw":
            index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = cfg.hnsw_ef_search
            return index
        quantizer = faiss.IndexFlatIP(d)
        if cfg.backend == "faiss_ivf_flat":
            index = faiss.IndexIVFFlat(quantizer, d, cfg.nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, d, cfg.nlist, cfg.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = cfg.nprobe
        return index

    def _index_add(self, keys: Tensor, first_global_id: int) -> None:
        """Add keys whose global entry ids start at ``first_global_id``."""
        data = np.ascontiguousarray(keys.detach().float().cpu().numpy())
        if hasattr(self.index, "is_trained") and not self.index.is_trained:
            # IVF indexes learn their cells from the first batch (it must hold >= nlist entries).
            if len(data) < self.config.nlist:
                raise HorizonError(f"{self.config.backend} needs at least nlist={self.config.nlist} entries "
                                   f"in its first add to train, got {len(data)}")
            self.index.train(data)
        if self.config.backend in ("faiss_ivf_flat", "faiss_ivf_pq"):
            ids = np.arange(first_global_id, first_global_id + len(data), dtype=np.int64)
            self.index.add_with_ids(data, ids)  # IVF keeps explicit ids through removals
        else:
            self.index.add(data)  # ids 0.. counted from index_base

    # -- interface -----------------------------------------------------------------------
    def add(self, keys: Tensor, values: Tensor, positions: Tensor) -> None:
        """Append a batch of entries: keys (n, Dk), values (n, Dv), positions (n,)."""
        if keys.shape[0] == 0:
            return
        if keys.shape[-1] != self.key_dim or values.shape[-1] != self.value_dim:
            raise ValueError(f"entries must have key width {self.key_dim} and value width {self.value_dim}")
        cap = self.config.capacity
        if cap and self.config.policy == "keep_all" and len(self) + keys.shape[0] > cap:
            raise HorizonError(f"memory store is full ({len(self)} of capacity {cap}, policy keep_all)")
        new_first = self.first_id + len(self)
        if self.keeps_keys:
            self.keys = torch.cat([self.keys, keys.detach().float().to(self.device)])  # (M+n, Dk)
        self.values = torch.cat([self.values, values.detach().float().to(self.device)])  # (M+n, Dv)
        self.positions = torch.cat([self.positions, positions.to(self.device, torch.long)])  # (M+n,)
        if self.index is not None:
            self._index_add(keys, new_first)
        if cap and len(self) > cap:
            drop = len(self) - cap
            self.values, self.positions = self.values[drop:], self.positions[drop:]
            if self.keeps_keys:
                self.keys = self.keys[drop:]
            self.first_id += drop
            if self.index is not None:
                self._evict_from_index(drop)

    def _evict_from_index(self, drop: int) -> None:
        if self.config.backend in ("faiss_ivf_flat", "faiss_ivf_pq"):
            import faiss

            ids = np.arange(self.first_id - drop, self.first_id, dtype=np.int64)
            self.index.remove_ids(faiss.IDSelectorBatch(ids))
            return
        # Flat renumbers on removal and HNSW cannot remove: rebuild from the kept keys.
        index = self._new_index()
        self.index, self.index_base = index, self.first_id
        self._index_add(self.keys, self.first_id)

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-k entries per query: scores (Q, k) float32 and row indices (Q, k) into the kept
        entries (-1 where fewer than k exist)."""
        q = queries.detach().float()
        n = len(self)
        if n == 0:
            empty = torch.full((q.shape[0], k), -1, dtype=torch.long)
            return torch.full((q.shape[0], k), float("-inf")), empty
        if self.index is None:
            scores, rows = exact_topk(q.to(self.device), self.keys, k, self.config.key_block)  # (Q, k')
        else:
            d, i = self.index.search(np.ascontiguousarray(q.cpu().numpy()), min(k, n))
            found = torch.from_numpy(i)  # (Q, k') FAISS ids
            valid = found >= 0
            rows = torch.where(valid, found + self.index_base - self.first_id, found)  # (Q, k') kept rows
            scores = torch.from_numpy(d).masked_fill(~valid, float("-inf"))  # (Q, k')
        if rows.shape[1] < k:
            pad = k - rows.shape[1]
            rows = torch.cat([rows, torch.full((rows.shape[0], pad), -1, dtype=torch.long, device=rows.device)], 1)
            scores = torch.cat([scores, torch.full((scores.shape[0], pad), float("-inf"), device=scores.device)], 1)
        return scores, rows

    def bytes_per_entry(self) -> float:
        """Bytes the search structure spends per entry: the index (FAISS) or the key matrix
        (torch). Values (4 * Dv bytes) and positions (8 bytes) are stored beside it."""
        if self.index is None:
            return float(self.keys.element_size() * self.key_dim)
        if self.config.backend == "faiss_ivf_pq":
            return float(self.config.pq_m + 8)  # code + id
        if self.config.backend == "faiss_ivf_flat":
            return float(4 * self.key_dim + 8)
        if self.config.backend == "faiss_hnsw":
            return float(4 * self.key_dim + 2 * self.config.hnsw_m * 4)
        return float(4 * self.key_dim)

    # -- persistence ---------------------------------------------------------------------
    def save(self, folder: Path) -> list[str]:
        """Write ``memory.safetensors`` (+ ``memory.faiss``) into ``folder``; returns the file names."""
        tensors = {"keys": self.keys.cpu().contiguous(), "values": self.values.cpu().contiguous(),
                   "positions": self.positions.cpu().contiguous(),
                   "ids": torch.tensor([self.first_id, self.index_base])}
        save_file(tensors, str(folder / "memory.safetensors"))
        names = ["memory.safetensors"]
        if self.index is not None:
            import faiss

            faiss.write_index(self.index, str(folder / "memory.faiss"))
            names.append("memory.faiss")
        return names

    @classmethod
    def load(cls, folder: Path, config: StoreConfig, device: torch.device | str = "cpu") -> MemoryStore:
        tensors = load_file(str(folder / "memory.safetensors"))
        store = cls(tensors["keys"].shape[1], tensors["values"].shape[1], config, device)
        store.keys = tensors["keys"].to(store.device) if store.keeps_keys else store.keys
        store.values = tensors["values"].to(store.device)
        store.positions = tensors["positions"].to(store.device)
        store.first_id, store.index_base = (int(x) for x in tensors["ids"].tolist())
        if config.backend != "torch":
            import faiss

            store.index = faiss.read_index(str(folder / "memory.faiss"))
            if hasattr(store.index, "nprobe"):
                store.index.nprobe = config.nprobe
            if store.index.ntotal != len(store):
                raise HorizonError(f"memory.faiss holds {store.index.ntotal} entries, memory.safetensors {len(store)}")
        return store

    def describe(self) -> dict[str, Any]:
        return {"entries": len(self), "first_id": self.first_id, "backend": self.config.backend}
