"""Chunked vs full LM head + cross-entropy: peak extra memory and time, in one run.

    .venv/bin/python bench/bench_cross_entropy.py            # 8,192 tokens x 128,256 vocab
    .venv/bin/python bench/bench_cross_entropy.py --device cuda --hidden 4096 --dtype bf16

Each path runs forward + backward (per-token loss, summed) in its own child process, so on
CPU the peak resident memory of one path cannot leak into the other's. "Extra memory" is
peak memory during forward+backward minus the memory held just before it (inputs, weight):
on CUDA from `torch.cuda.max_memory_allocated`, on CPU from the process's peak RSS
(`ru_maxrss`). Goals (issue 3): chunked extra memory <= 20% of the full path's, speed
>= 0.8x of the full path's.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def run_one(path: str, tokens: int, vocab: int, hidden: int, chunk: int, dtype_name: str, device: str, repeats: int) -> dict:
    import torch

    from prolong_nemo.model.cross_entropy import chunked_linear_cross_entropy, full_linear_cross_entropy

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device, dtype=dtype) * hidden**-0.5).requires_grad_()
    y = torch.randint(0, vocab, (tokens,), device=device)
    fn = (lambda: full_linear_cross_entropy(h, w, y)) if path == "full" else (
        lambda: chunked_linear_cross_entropy(h, w, y, chunk_tokens=chunk)
    )
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times, loss = [], None
    for _ in range(repeats):
        h.grad = w.grad = None
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if cuda else _rss_bytes()
        start = time.perf_counter()
        loss = fn().sum()
        loss.backward()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()
    return {
        "path": path, "seconds": min(times), "extra_bytes": peak - before,
        "loss": float(loss), "grad_w_norm": float(w.grad.float().norm()),
    }


def child(args: argparse.Namespace, path: str) -> dict:
    cmd = [sys.executable, __file__, "--child", path, "--tokens", str(args.tokens), "--vocab", str(args.vocab),
           "--hidden", str(args.hidden), "--chunk", str(args.chunk), "--dtype", args.dtype,
           "--device", args.device, "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=256, help="4096 for Llama-3-8B (slow on CPU)")
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.tokens, args.vocab, args.hidden, args.chunk, args.dtype,
                                 args.device, args.repeats)))
        return
    chunked, full = child(args, "chunked"), child(args, "full")
    mem_ratio = chunked["extra_bytes"] / full["extra_bytes"]
    speed_ratio = full["seconds"] / chunked["seconds"]
    rel_loss = abs(chunked["loss"] - full["loss"]) / abs(full["loss"])
    gib = 2**30
    print(f"{args.tokens} tokens x {args.vocab} vocab, hidden {args.hidden}, {args.dtype} on {args.device}, chunk {args.chunk}")
    for r in (full, chunked):
        print(f"  {r['path']:8s} extra peak memory {r['extra_bytes'] / gib:7.3f} GiB   time {r['seconds']:8.3f} s")
    print(f"  chunked/full extra memory {mem_ratio:.3f} (goal <= 0.20)   speed chunked vs full {speed_ratio:.3f}x (goal >= 0.8)")
    print(f"  loss relative difference {rel_loss:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "full": full, "chunked": chunked,
                                               "memory_ratio": mem_ratio, "speed_ratio": speed_ratio}, indent=2))


if __name__ == "__main__":
    main()
