"""Balance each global batch's compute across data-parallel ranks (issue 12).

A packed sample's cost is not its token count: attention grows with the square of each
document's length, so at Llama-3-8B width a row holding one whole 64K document costs about 2x a
row of 64 1K documents, and at 512K attention dominates. Every optimizer step waits for the
slowest DP rank, so ``BalancedDataset`` reorders the samples *inside* each global batch so that
each rank's share costs about the same.

Contract
--------
* ``BalancedDataset(dataset, global_batch_size, micro_batch_size, dp_size, cost)`` is a view:
  ``len`` is unchanged and ``view[i] == dataset[block_start + perm_b[i - block_start]]`` where
  block ``b = i // global_batch_size`` and ``perm_b`` is a permutation of that block. Every
  global batch therefore holds exactly the samples it held before (the step's loss is the same
  up to summation order), and the whole view is a bijection of ``range(len(dataset))``.
* ``perm_b`` is a pure function of the block's costs, i.e. of its sample indices and their
  document lengths: no RNG, no communication, no state. Every rank (DP ranks, and the TP / CP /
  PP peers that must read the same rows) computes the same permutation, and resuming from
  ``consumed_samples`` (a multiple of the global batch size) reproduces it exactly. Which
  samples make up a step never depends on the cost model, ``dp_size`` or ``mbs``: resuming
  with other parallelism or another cost only moves samples between the ranks of a step.
* The layout matches Megatron's ``MegatronPretrainingSampler`` (``dataloader_type="single"``):
  it walks consecutive indices from ``consumed_samples`` in blocks of ``mbs * dp`` and gives DP
  rank ``r`` the slice ``[r * mbs, (r + 1) * mbs)`` of each block. So rank ``r``'s micro-batch
  ``m`` of step ``b`` is positions ``m * mbs * dp + r * mbs + [0, mbs)`` of global batch ``b``;
  each rank keeps exactly ``global_batch_size / dp`` samples. It assumes that sampler and a
  constant global batch size (no ramp-up); other samplers still see a bijection, unbalanced.
* Assignment: LPT (longest processing time first) with a capacity of ``global / dp`` samples
  per rank: samples in descending cost (ties: lower index first) each go to the rank whose sum
  is lowest among ranks with room (ties: lower rank). If that is somehow worse than the
  unbalanced layout (LPT is a heuristic), the block keeps the identity order, so the slowest
  rank's cost never grows. Each rank runs its samples largest first (micro-batch order), so a
  step that does not fit in memory fails at its first micro-batch.
* A trailing partial global batch is balanced over its complete ``mbs * dp`` micro-steps; the
  last incomplete micro-step (only ever read with ``drop_last=False``) keeps its order.
* Cost of a sample: ``cost(segment_lengths)`` for the segment lengths of its packed row (the
  differences of ``cu_seqlens``: documents of > 1 token, CP-padded). ``CostModel`` is
  ``dense * tokens + attention * sum(l ** 2)``; the default coefficients come from the
  Llama-3-8B shape (``CostModel.from_arch``). Any callable ``lengths -> float`` works (e.g. an
  exact FLOP model); it must be deterministic.
* Lengths come cheaply: for ProLong MDS domains (also inside Megatron's ``BlendedDataset``)
  only the ``indices`` and ``length`` columns of a sample are read from its shard, not the
  tokens, and no row is built; any other dataset is asked for its row (``cu_seqlens``). Every
  rank reads the lengths of the whole global batch (once per block and dataloader worker):
  ~40-120 us a 64K sample against ~0.9-1.5 ms for its row (bench/bench_balance.py).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from prolong_nemo.data.mds import mds_document_bounds
from prolong_nemo.data.packing import document_segments, padded_lengths
from prolong_nemo.model import flops
from prolong_nemo.model.config import LlamaArch

Cost = Callable[[np.ndarray], float]  # segment lengths of one packed row -> its cost
SegmentLengths = Callable[[int], np.ndarray]  # sample index -> segment lengths of its row
CACHED_BLOCKS = 4  # permutations kept per view (dataloader workers prefetch a step or two ahead)


@dataclass(frozen=True)
class CostModel:
    """``dense_per_token * sum(l) + attention_per_token2 * sum(l ** 2)`` over a row's segments.

    Both in training FLOPs (forward + backward = 3x forward) per token and per token pair.
    """

    dense_per_token: float
    attention_per_token2: float

    @classmethod
    def from_arch(cls, arch: LlamaArch | None = None) -> CostModel:
        """The model training FLOPs of `prolong_nemo.model.flops` (default Llama-3-8B), which are
        linear in a row's sum l (dense, LM head, attention's diagonal) and sum l^2 (attention)."""
        arch = arch or LlamaArch()
        per_token = flops.dense_flops_per_token(arch) + flops.lm_head_flops_per_token(arch)
        return cls(dense_per_token=3.0 * (per_token + flops.attention_flops_from_moments(arch, 1.0, 0.0)),
                   attention_per_token2=3.0 * flops.attention_flops_from_moments(arch, 0.0, 1.0))

    def __call__(self, lengths: np.ndarray) -> float:
        lengths = np.asarray(lengths, dtype=np.float64)  # exact: sums of l^2 stay far below 2^53
        return float(self.dense_per_token * lengths.sum() + self.attention_per_token2 * (lengths * lengths).sum())


LLAMA3_8B_COST = CostModel.from_arch()


def assign_block(costs: np.ndarray, dp_size: int, micro_batch_size: int) -> np.ndarray:
    """``order`` with ``order[p]`` = the block offset placed at position ``p`` (see the module doc).

    ``len(costs)`` must be a multiple of ``dp_size * micro_batch_size``.
    """
    costs = np.asarray(costs, dtype=np.float64)
    n, step = len(costs), dp_size * micro_batch_size
    if n % step:
        raise ValueError(f"{n} samples do not split into micro-steps of {micro_batch_size} x {dp_size} ranks")
    capacity = n // dp_size
    members: list[list[int]] = [[] for _ in range(dp_size)]
    heap = [(0.0, rank) for rank in range(dp_size)]  # (sum so far, rank): ties go to the lower rank
    for offset in np.lexsort((np.arange(n), -costs)).tolist():  # descending cost, then index
        load, rank = heapq.heappop(heap)
        members[rank].append(offset)  # descending cost within a rank: largest micro-batch first
        if len(members[rank]) < capacity:
            heapq.heappush(heap, (load + costs[offset], rank))
    order = np.empty(n, dtype=np.int64)
    for rank, offsets in enumerate(members):
        for k, offset in enumerate(offsets):
            micro, j = divmod(k, micro_batch_size)
            order[micro * step + rank * micro_batch_size + j] = offset
    if rank_costs(costs[order], dp_size, micro_batch_size).max() >= rank_costs(costs, dp_size, micro_batch_size).max():
        return np.arange(n)  # LPT did not help: keep the sampler's own layout
    return order


def rank_costs(costs_by_position: np.ndarray, dp_size: int, micro_batch_size: int) -> np.ndarray:
    """Per-rank sums of one global batch laid out as Megatron's sampler reads it."""
    costs = np.asarray(costs_by_position, dtype=np.float64)
    return costs.reshape(-1, dp_size, micro_batch_size).sum(axis=(0, 2))


@dataclass(frozen=True)
class Balancing:
    """What ``build_datasets(..., balance=Balancing(...))`` needs to wrap the train split."""

    global_batch_size: int
    micro_batch_size: int
    dp_size: int
    cost: Cost = LLAMA3_8B_COST

    def wrap(self, dataset) -> BalancedDataset:
        return BalancedDataset(dataset, self.global_batch_size, self.micro_batch_size, self.dp_size, self.cost)


class BalancedDataset:
    """A view of ``dataset`` whose global batches are balanced across DP ranks (module doc)."""

    def __init__(self, dataset, global_batch_size: int, micro_batch_size: int, dp_size: int,
                 cost: Cost = LLAMA3_8B_COST, segment_lengths: SegmentLengths | None = None) -> None:
        if min(global_batch_size, micro_batch_size, dp_size) < 1:
            raise ValueError("global_batch_size, micro_batch_size and dp_size must be >= 1")
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(f"global_batch_size {global_batch_size} is not a multiple of micro_batch_size "
                             f"{micro_batch_size} x dp_size {dp_size}")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_size = dp_size
        self.cost = cost
        self.segment_lengths = segment_lengths or segment_lengths_reader(dataset)
        self._orders: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int):
        return self.dataset[self.source_index(idx)]

    def __getattr__(self, name: str):
        """Everything else (split, unique_description, ...) is the wrapped dataset's."""
        dataset = self.__dict__.get("dataset")
        if dataset is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(dataset, name)

    def source_index(self, idx: int) -> int:
        """The index in the wrapped dataset behind view index ``idx``."""
        idx = int(idx)
        if not 0 <= idx < len(self):
            raise IndexError(f"index {idx} out of range [0, {len(self)})")
        block, offset = divmod(idx, self.global_batch_size)
        order = self.block_order(block)
        start = block * self.global_batch_size
        return start + int(order[offset]) if offset < len(order) else idx

    def block_order(self, block: int) -> np.ndarray:
        """The permutation of global batch ``block`` (over its complete micro-steps)."""
        if block not in self._orders:
            self._orders[block] = assign_block(self.block_costs(block), self.dp_size, self.micro_batch_size)
            while len(self._orders) > CACHED_BLOCKS:
                self._orders.popitem(last=False)
        return self._orders[block]

    def block_costs(self, block: int) -> np.ndarray:
        """Costs of the wrapped samples of global batch ``block`` in their original order,
        cut to whole micro-steps (``mbs * dp`` samples each)."""
        start = block * self.global_batch_size
        n = min(self.global_batch_size, len(self) - start)
        n -= n % (self.micro_batch_size * self.dp_size)
        return np.array([self.cost(self.segment_lengths(start + k)) for k in range(n)], dtype=np.float64)


# ---- lengths without building rows ---------------------------------------------------------
def segment_lengths_reader(dataset) -> SegmentLengths:
    """``index -> segment lengths`` for ``dataset``, as cheaply as its type allows (picklable,
    for dataloader workers of any start method)."""
    from megatron.core.datasets.blended_dataset import BlendedDataset

    from prolong_nemo.data.dataset import ProLongDomainDataset

    if isinstance(dataset, BlendedDataset):
        return _BlendedLengths(dataset)
    if isinstance(dataset, ProLongDomainDataset):
        return _DomainLengths(dataset)
    return _RowLengths(dataset)


class _RowLengths:
    """Any dataset of contract rows: build the row, difference its ``cu_seqlens``."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __call__(self, idx: int) -> np.ndarray:
        return np.diff(np.asarray(self.dataset[idx]["cu_seqlens"], dtype=np.int64).reshape(-1))


class _DomainLengths:
    """A ``ProLongDomainDataset``: its row's segments (as ``build_row`` cuts and pads them) from
    the MDS ``length`` / ``indices`` columns alone."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __call__(self, idx: int) -> np.ndarray:
        packing = self.dataset.config.packing
        n, indices = mds_document_bounds(self.dataset.dataset, self.dataset.sample_index(idx))
        starts, ends = document_segments(n, indices, packing.document_masking)
        return padded_lengths(ends - starts, packing)


class _BlendedLengths:
    """Megatron's ``BlendedDataset``: follow its (dataset, sample) index to the domain's reader."""

    def __init__(self, blended) -> None:
        self.blended = blended
        self.readers = [segment_lengths_reader(d) for d in blended.datasets]

    def __call__(self, idx: int) -> np.ndarray:
        blended = self.blended
        if blended.dataset_index is None:  # defer_npy_index_mmap: loaded on first use, as Megatron does
            blended.dataset_index = np.load(blended.path_to_dataset_index, mmap_mode="r")
            blended.dataset_sample_index = np.load(blended.path_to_dataset_sample_index, mmap_mode="r")
        return self.readers[int(blended.dataset_index[idx])](int(blended.dataset_sample_index[idx]))
