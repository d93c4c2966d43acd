"""Synthetic ProLong-format MDS data for the data tests (written with mosaicml-streaming)."""

from __future__ import annotations

import numpy as np

from prolong_nemo.data.mds import write_domain


def random_documents(rng: np.random.Generator, length: int, max_docs: int, vocab: int = 128256):
    """A packed sample: token ids and sorted, contiguous [start, end) document indices."""
    ids = rng.integers(0, vocab, length).astype(np.uint32)
    n_cuts = int(rng.integers(0, max_docs))
    cuts = np.sort(rng.choice(np.arange(1, length), size=min(n_cuts, length - 1), replace=False))
    bounds = np.concatenate([[0], cuts, [length]])
    indices = np.stack([bounds[:-1], bounds[1:]], axis=1).astype(np.uint32)
    return ids, indices


def write_random_domain(folder, n: int, length: int, *, seed: int = 0, with_mask: bool = False,
                        max_docs: int = 8, drop_indices_every: int = 0, size_limit: int = 1 << 26) -> list[dict]:
    """Write ``n`` random packed samples; every ``drop_indices_every``-th has no ``indices``."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        ids, indices = random_documents(rng, length, max_docs)
        sample = {"input_ids": ids, "indices": indices, "length": length, "domain": str(folder).split("/")[-1]}
        if drop_indices_every and i % drop_indices_every == 0:
            sample["indices"] = np.zeros((0, 2), dtype=np.uint32)
        if with_mask:
            sample["mask"] = (rng.random(length) < 0.5).astype(np.uint8)
        samples.append(sample)
    write_domain(str(folder), samples, with_mask=with_mask, size_limit=size_limit)
    return samples


class Exploit:
    """A value whose unpickling creates the file `path` (proof that something unpickled it)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))
