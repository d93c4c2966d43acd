"""Measured step time with and without cost-balanced global batches, the CPU runner at DP = 2.

    .venv/bin/python bench/bench_balance_cpu.py [--steps 10] [--global-batch 8] [--seq-length 16384]
                                                [--short-doc 512]

Deliberately uneven rows: half the samples of one MDS domain hold a single document as long as
the sample (attention ~ l^2 dominates), half hold `--short-doc`-token documents. On a CPU the
THD attention runs one SDPA call per document, so rows of very many tiny documents cost their
per-call overhead, which FLOPs do not see: at 4,096 tokens a row of 64-token documents took as
long as one 4,096-token document (0.21 s vs 0.20 s per row here), at 16,384 tokens with
512-token documents the long row takes ~3.8x the short one; the defaults are the latter. The CPU runner
(megatron-core's model and schedules on gloo, ranks handed their rows by megatron's
`MegatronPretrainingSampler`) trains the llama3-tiny model on them under torchrun with 2 ranks,
the same run alternating `balance` off / on (build_prolong_datasets(..., balance=...)). A step's
time on rank 0 includes the gradient all-reduce, so it is the slower rank's time. Prints the
mean step time of each, their ratio, and the largest per-step loss difference (the samples of a
step are the same: the loss may differ only in summation order). Steps 1-2 of each run are
warm-up and not counted. Absolute times here are noise; the ratio is the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

VOCAB = 512  # llama3-tiny


def write_uneven_domain(folder: Path, samples: int, length: int, short_doc: int, seed: int = 0) -> None:
    from prolong_nemo.data.mds import write_domain

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(samples):
        bounds = [0, length] if i % 2 == 0 else list(range(0, length + 1, short_doc))
        rows.append({"input_ids": rng.integers(0, VOCAB, length).astype(np.uint32),
                     "indices": np.stack([bounds[:-1], bounds[1:]], 1).astype(np.uint32),
                     "length": length, "domain": folder.name})
    write_domain(str(folder), rows)


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from prolong_nemo.data.dataset import collate
    from prolong_nemo.training.cpu import runner
    from prolong_nemo.training.data import build_prolong_datasets

    runner.init_distributed(seed=1)
    dp = dist.get_world_size()
    cfg = runner.TrainConfig(preset="llama3-tiny", seq_length=args.seq_length, train_iters=args.steps,
                             micro_batches=args.global_batch // dp, warmup_iters=1, chunk_tokens=1024)
    results: dict[str, list] = {"off": [], "on": []}
    balanced = None
    for repeat in range(args.repeats):
        for mode in ("off", "on") if repeat % 2 == 0 else ("on", "off"):  # alternate: no drift favours one
            rows, _, _ = build_prolong_datasets(
                domains=[{"path": args.data, "proportion": 1.0}], seq_length=args.seq_length, seed=3,
                document_masking=True, cp_size=1, tp_size=1, sequence_parallel=False, vocab_size=VOCAB,
                cache_dir=None, train_samples=args.steps * args.global_batch, balance=mode == "on",
                global_batch_size=args.global_batch, dp_size=dp, preset="llama3-tiny")
            state = runner.train(cfg, rows, collate, log=lambda _: None)
            results[mode].append([(r.step, r.loss, r.seconds) for r in state.history])
            balanced = rows if mode == "on" else balanced
    results["model_ratio"] = model_ratio(balanced, args.global_batch, dp, args.steps)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results))


def model_ratio(balanced, global_batch: int, dp: int, steps: int) -> float:
    """What the cost model expects for these rows: sum over steps of the costliest rank's cost,
    balanced over unbalanced (steps 3.. as timed)."""
    from prolong_nemo.data.balance import rank_costs

    off = on = 0.0
    for block in range(2, steps):  # noqa: B007
        costs = balanced.block_costs(block)
        off += rank_costs(costs, dp, 1).max()
        on += rank_costs(costs[balanced.block_order(block)], dp, 1).max()
    return on / off


def summarize(results: dict[str, list]) -> dict[str, float]:
    def mean_step(runs: list) -> float:
        return float(np.mean([seconds for run in runs for step, _, seconds in run if step > 2]))

    off, on = mean_step(results["off"]), mean_step(results["on"])
    loss_diff = max(abs(a[1] - b[1]) for run_off, run_on in zip(results["off"], results["on"])
                    for a, b in zip(run_off, run_on))
    return {"step_s_unbalanced": off, "step_s_balanced": on, "ratio": on / off,
            "cost_model_ratio": results["model_ratio"], "max_loss_diff": loss_diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=16384)
    parser.add_argument("--short-doc", type=int, default=512, help="document length of the short rows")
    parser.add_argument("--repeats", type=int, default=2, help="off/on pairs, alternating order")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "uneven", Path(tmp) / "result.json"
        write_uneven_domain(data, samples=args.steps * args.global_batch, length=args.seq_length,
                            short_doc=args.short_doc)
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
               "--worker", "--data", str(data), "--out", str(out), "--steps", str(args.steps),
               "--global-batch", str(args.global_batch), "--seq-length", str(args.seq_length),
               "--repeats", str(args.repeats)]
        subprocess.run(cmd, check=True, env={**env, "PYTHONWARNINGS": "ignore"}, stdout=subprocess.DEVNULL)
        summary = summarize(json.loads(out.read_text()))
    print(json.dumps(summary))
    print(f"CPU runner, DP=2, {args.global_batch} rows of {args.seq_length} tokens per step (half one document, "
          f"half {args.short_doc}-token documents), steps 3-{args.steps} x {args.repeats} runs each:")
    print(f"  unbalanced {summary['step_s_unbalanced']:.3f} s/step, balanced {summary['step_s_balanced']:.3f} s/step: "
          f"measured ratio {summary['ratio']:.3f} (cost model: {summary['cost_model_ratio']:.3f}); "
          f"largest per-step loss difference {summary['max_loss_diff']:.2e}")


if __name__ == "__main__":
    main()
