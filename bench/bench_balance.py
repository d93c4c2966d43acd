"""Expected step time with and without cost-balanced global batches (prolong_nemo/data/balance.py).

    .venv/bin/python bench/bench_balance.py [--steps 400] [--dp 4 8 16] [--mds 64K:DIR=0.3 ...]

A step's time is its slowest DP rank's cost (the cost model: Llama-3-8B training FLOPs, dense
per token + attention per l^2 of each document). For each mixture and DP size this prints the
cost-model step time summed over the steps, relative to the unbalanced baseline of the same
samples in the same run (Megatron's sampler layout), and relative to the ideal (per step, the
larger of the mean rank cost and the costliest single sample). The row layout is the real
``BalancedDataset`` read through megatron-core's ``MegatronPretrainingSampler``.

The document-length distributions are MODELLED (no ProLong data on this machine), per domain
with the stage YAML proportions (recipes/stage_64k.yaml, stage_512k.yaml), samples drawn
i.i.d. by proportion:

* long domains (code repos, books at the stage length): 90% one document filling the sample,
  10% a document's tail (uniform 1/8 .. 7/8 of the sample) followed by the next document's head;
* "-65536" long domains in the 512K stage: 8 whole 64K documents per sample;
* short domains: lognormal document lengths (median below, sigma 1.0; arxiv / textbooks 0.8),
  at least 16 tokens, packed in order and the last one cut at the sample boundary.

``--mds STAGE:DIR=PROPORTION`` (repeatable; STAGE 64K or 512K) replaces the modelled stage by
real MDS domain folders read through ``build_datasets(..., balance=...)``. The run also times
the cheap length read (``length`` / ``indices`` columns only) against building the full row, on
a synthetic 64K MDS domain written to a temporary folder (or the given folders).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from prolong_nemo.data.balance import LLAMA3_8B_COST, BalancedDataset, Balancing, rank_costs

# (proportion, kind, parameter): kind "long" fills the sample, "chunks" is 8 x 64K, "short" is
# lognormal (median, sigma).
SHORT_64K_512K = {
    "fineweb-edu": (0.10, "short", (1100, 1.0)),
    "fineweb-2023-50": (0.10, "short", (800, 1.0)),
    "stackexchange": (0.04, "short", (600, 1.0)),
    "dolmawiki": (0.04, "short", (500, 1.0)),
    "tuluv2": (0.03, "short", (900, 1.0)),
    "arxiv": (0.03, "short", (9000, 0.8)),
    "openwebmath": (0.03, "short", (1500, 1.0)),
    "textbooks": (0.03, "short", (16000, 0.8)),
}
STAGES = {
    "64K": (65536, 64, {"thestackv1_concat_by_repo-65536": (0.30, "long", None),
                        "book-65536": (0.30, "long", None), **SHORT_64K_512K}),
    "512K": (524288, 16, {"thestackv1_concat_by_repo-524288": (0.15, "long", None),
                          "thestackv1_concat_by_repo-65536": (0.15, "chunks", None),
                          "book-524288": (0.05, "long", None),
                          "book-65536": (0.25, "chunks", None), **SHORT_64K_512K}),
}


def modelled_sample(rng: np.random.Generator, kind: str, param, length: int) -> np.ndarray:
    """Document lengths of one packed sample of a domain (see the module doc)."""
    if kind == "chunks":
        return np.full(length // 65536, 65536)
    if kind == "long":
        if rng.random() < 0.9:
            return np.array([length])
        cut = int(rng.uniform(1 / 8, 7 / 8) * length)
        return np.array([cut, length - cut])
    median, sigma = param
    docs = np.maximum(rng.lognormal(np.log(median), sigma, size=4 * length // median + 8).astype(np.int64), 16)
    ends = np.cumsum(docs)
    kept = docs[ends < length]
    return np.append(kept, length - kept.sum())


def modelled_stage(stage: str, samples: int, seed: int = 0) -> list[np.ndarray]:
    length, _, domains = STAGES[stage]
    rng = np.random.default_rng(seed)
    names = list(domains)
    weights = np.array([domains[n][0] for n in names])
    picks = rng.choice(len(names), size=samples, p=weights / weights.sum())
    return [modelled_sample(rng, *domains[names[k]][1:], length) for k in picks]


def step_times(costs_by_position: np.ndarray, gbs: int, dp: int) -> tuple[float, float]:
    """(sum over steps of the slowest rank's cost, sum of the ideal per-step bound)."""
    steps = costs_by_position[:len(costs_by_position) // gbs * gbs].reshape(-1, gbs)
    slowest = sum(rank_costs(s, dp, 1).max() for s in steps)
    ideal = sum(max(s.sum() / dp, s.max()) for s in steps)
    return float(slowest), float(ideal)


def sampler_order(view, dp: int) -> np.ndarray:
    """The view's wrapped indices in the order megatron-core's sampler lays them out: for each
    micro-step, rank 0's micro-batch, rank 1's, ... (positions of ``rank_costs``)."""
    from megatron.training.datasets.data_samplers import MegatronPretrainingSampler

    per_rank = [list(MegatronPretrainingSampler(len(view), 0, 1, r, dp)) for r in range(dp)]
    return np.array([view.source_index(b[0]) for micro in zip(*per_rank) for b in micro])


def simulate(name: str, costs: np.ndarray, lengths_of, gbs: int, dps: list[int]) -> list[tuple]:
    import megatron.training.datasets.data_samplers  # noqa: F401  (import cost outside the timings)

    rows = []
    for dp in dps:
        if gbs % dp:
            continue
        view = BalancedDataset(list(range(len(costs))), gbs, 1, dp, segment_lengths=lengths_of)
        start = time.perf_counter()
        order = sampler_order(view, dp)
        sec = time.perf_counter() - start
        base, ideal = step_times(costs[:len(order)], gbs, dp)
        balanced, _ = step_times(costs[order], gbs, dp)
        rows.append((name, gbs, dp, gbs // dp, base / ideal, balanced / ideal, balanced / base,
                     1e3 * sec / (len(order) // gbs)))
    return rows


def time_length_reads(dataset, n: int) -> tuple[float, float]:
    """Seconds per sample: the cheap length read vs the full row, on the same (cached) data."""
    view = Balancing(1, 1, 1).wrap(dataset)
    idx = list(range(min(n, len(dataset))))
    for i in idx:  # warm the page cache for both
        dataset[i]
    start = time.perf_counter()
    for i in idx:
        view.segment_lengths(i)
    fast = (time.perf_counter() - start) / len(idx)
    start = time.perf_counter()
    for i in idx:
        dataset[i]
    full = (time.perf_counter() - start) / len(idx)
    return fast, full


def mds_stage(specs: list[str], steps: int, gbs: int, length: int):
    from prolong_nemo.data.dataset import build_datasets, dataset_config
    from prolong_nemo.data.mixture import Mixture

    pairs = [(s.rsplit("=", 1)[0], float(s.rsplit("=", 1)[1])) for s in specs]
    config = dataset_config(Mixture.parse(pairs), sequence_length=length)
    return build_datasets(config, [steps * gbs, None, None])[0]


def synthetic_mds(folder: Path, samples: int) -> object:
    from prolong_nemo.data.mds import write_domain

    rng = np.random.default_rng(1)
    rows = []
    for docs in modelled_stage("64K", samples, seed=1):
        ends = np.cumsum(docs)
        indices = np.stack([ends - docs, ends], 1).astype(np.uint32)
        rows.append({"input_ids": rng.integers(0, 128256, 65536).astype(np.uint32), "indices": indices,
                     "length": 65536, "domain": "bench"})
    write_domain(str(folder / "synthetic-64K"), rows)
    return mds_stage([f"{folder / 'synthetic-64K'}=1"], 1, samples, 65536)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--dp", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--mds", action="append", default=[], metavar="STAGE:DIR=PROPORTION")
    parser.add_argument("--read-samples", type=int, default=64, help="samples timed for the length read")
    args = parser.parse_args()
    for name in ("megatron", "prolong_nemo"):
        logging.getLogger(name).setLevel(logging.WARNING)

    rows, real = [], {}
    for spec in args.mds:
        stage, folder = spec.split(":", 1)
        real.setdefault(stage.upper(), []).append(folder)
    for stage, (length, gbs, _) in STAGES.items():
        if stage in real:
            dataset = mds_stage(real[stage], args.steps, gbs, length)
            view = Balancing(gbs, 1, 1).wrap(dataset)
            lengths = [view.segment_lengths(i) for i in range(len(dataset))]
            label = f"{stage} MDS"
        else:
            lengths = modelled_stage(stage, args.steps * gbs)
            label = f"{stage} modelled"
        costs = np.array([LLAMA3_8B_COST(d) for d in lengths])
        rows += simulate(label, costs, lambda i, lengths=lengths: lengths[i], gbs, args.dp)
        tokens = np.array([d.sum() for d in lengths])
        attention = 1 - LLAMA3_8B_COST.dense_per_token * tokens.sum() / costs.sum()
        print(f"{label}: {len(costs)} samples, mean {tokens.mean():.0f} tokens, documents per sample "
              f"median {np.median([len(d) for d in lengths]):.0f}; sample cost max/min "
              f"{costs.max() / costs.min():.2f}, attention share of the cost {attention:.2f}")
    print()
    print("| mixture | global batch | DP | samples/rank | unbalanced / ideal | balanced / ideal "
          "| **balanced / unbalanced** | permutation ms/step, all ranks |")
    print("|---|---|---|---|---|---|---|---|")
    for name, gbs, dp, k, base, bal, ratio, ms in rows:
        print(f"| {name} | {gbs} | {dp} | {k} | {base:.3f} | {bal:.3f} | **{ratio:.3f}** | {ms:.2f} |")

    print()
    with tempfile.TemporaryDirectory(prefix="bench_balance_") as tmp:
        dataset = mds_stage(real["64K"], 1, args.read_samples, 65536) if "64K" in real else \
            synthetic_mds(Path(tmp), args.read_samples)
        fast, full = time_length_reads(dataset, args.read_samples)
        print(f"length read (length/indices columns only): {1e6 * fast:.0f} us/sample; full row: "
              f"{1e6 * full:.0f} us/sample; fast / full = {fast / full:.3f}")


if __name__ == "__main__":
    main()
