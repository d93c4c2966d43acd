"""Packed rows with learnable structure, for the CPU smoke test and the demo (no MDS needed).

Every document is an arithmetic sequence modulo the vocabulary: after two tokens the rest
is determined, so a model that attends within its document drives the loss well below the
uniform log(V). Rows go through the data adapter's `build_row`, so they are contract rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ArithmeticDocuments:
    vocab_size: int
    row_tokens: int = 256
    min_doc: int = 8
    max_doc: int = 96
    max_step: int = 3
    num_rows: int = 10_000
    seed: int = 0
    cp_size: int = 1

    def __len__(self) -> int:
        return self.num_rows

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, document [start, end) pairs) of sample `index`, deterministic."""
        rng = np.random.default_rng((self.seed, index))
        ids, bounds, pos = [], [], 0
        while pos < self.row_tokens:
            n = min(int(rng.integers(self.min_doc, self.max_doc + 1)), self.row_tokens - pos)
            start, step = rng.integers(1, self.vocab_size), rng.integers(1, self.max_step + 1)
            # ids stay in [1, V): 0 is the pad id
            ids.append(1 + (start - 1 + step * np.arange(n)) % (self.vocab_size - 1))
            bounds.append((pos, pos + n))
            pos += n
        return np.concatenate(ids).astype(np.int64), np.asarray(bounds, dtype=np.int64)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        from prolong_nemo.data.packing import PackingConfig, build_row

        ids, indices = self.sample(index)
        return build_row(ids, indices, None, PackingConfig(cp_size=self.cp_size))
