#!/usr/bin/env python
"""Benchmark both conversions on a Llama-3-8B-shaped checkpoint (random bf16, about 16 GB).

One run: generate the HF folder, time a plain copy of it, convert HF -> Megatron, time a plain
copy of the Megatron folder, convert Megatron -> HF, check the round trip bit for bit (digests of the generated tensors), print
time / peak RSS / ratio to the copy, and delete everything it wrote (unless --keep).
Each conversion runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own.

    .venv/bin/python bench/bench_convert.py                 # full 8B shape, ~50 GB of writes
    .venv/bin/python bench/bench_convert.py --layers 2      # quick smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from prolong_nemo.convert.hf_config import HfExtras, hf_config_dict
from prolong_nemo.convert.mapping import hf_shape, global_maps, LAYER_MAPS
from prolong_nemo.convert.safetensors_io import PlannedTensor, SafetensorsFolder, ShardWriter, plan_shards, shard_names, write_index
from prolong_nemo.model.config import preset

_CHILD = """
import json, sys, time
from prolong_nemo.convert.pipelines import hf_to_megatron, megatron_to_hf
kind, src, dst, fsync = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
t0 = time.perf_counter()
fn = hf_to_megatron if kind == "hf-to-megatron" else megatron_to_hf
fn(src, dst, fsync=fsync, show_progress=False)
seconds = time.perf_counter() - t0
# VmHWM: this process's own peak RSS (ru_maxrss would include the parent's at fork time)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print(json.dumps({"seconds": seconds, "peak_rss_kb": int(hwm)}))
"""


def _random_tensor(pool: torch.Tensor, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    numel = torch.Size(shape).numel()
    start = int(torch.randint(0, pool.numel(), (1,), generator=gen))
    reps = (start + numel) // pool.numel() + 1
    flat = pool.repeat(reps)[start: start + numel] if reps > 1 else pool[start: start + numel]
    return flat.reshape(shape).clone()


def digest(tensor: torch.Tensor) -> str:
    return hashlib.blake2b(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy())).hexdigest()


def generate_hf(folder: Path, arch, seed: int = 0) -> dict[str, str]:
    """A random bf16 HF folder streamed to disk (5 GB shards); returns each tensor's digest."""
    names = [n for m in global_maps(arch) for n in m.hf_names(None)]
    names += [n for i in range(arch.num_layers) for m in LAYER_MAPS for n in m.hf_names(i)]
    plan = [PlannedTensor(n, torch.bfloat16, hf_shape(arch, n)) for n in names]
    shards = plan_shards([[t] for t in plan], 5 * 1000**3)
    files = shard_names(len(shards))
    folder.mkdir(parents=True)
    # randn for 8e9 values takes minutes on 2 cores: cut every tensor from a random offset of
    # a 256 MB random pool instead (distinct contents per tensor; speed is content-blind).
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(1 << 27, generator=gen).mul_(0.02).to(torch.bfloat16)
    digests: dict[str, str] = {}
    for shard, fname in zip(shards, files):
        writer = ShardWriter(folder / fname, shard, fsync=False)
        for t in shard:
            tensor = _random_tensor(pool, t.shape, gen)
            digests[t.name] = digest(tensor)
            writer.write(t.name, tensor)
        writer.close()
    write_index(folder, shards, files)
    (folder / "config.json").write_text(json.dumps(hf_config_dict(arch, HfExtras())))
    os.sync()
    return digests


def copy_tree(src: Path, dst: Path, fsync: bool) -> float:
    """A plain file copy with the same durability as the converters (fsync per file)."""
    t0 = time.perf_counter()
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        if fsync:
            with open(target, "rb+") as f:
                os.fsync(f.fileno())
    return time.perf_counter() - t0


def convert(kind: str, src: Path, dst: Path, fsync: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, kind, str(src), str(dst), "1" if fsync else "0"],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bit_exact(folder: Path, digests: dict[str, str]) -> bool:
    """Every tensor of `folder` has the digest (bytes, hence dtype) generated for it."""
    reader = SafetensorsFolder(folder)
    try:
        return sorted(reader.tensors) == sorted(digests) and all(
            reader.tensors[n].dtype == torch.bfloat16 and digest(reader.read(n)) == d for n, d in digests.items()
        )
    finally:
        reader.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/prolong_bench_convert"))
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--layers", type=int, help="override num_layers (smoke runs)")
    parser.add_argument("--no-fsync", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the generated folders")
    args = parser.parse_args()

    arch = preset(args.preset) if args.layers is None else preset(args.preset, num_layers=args.layers)
    fsync = not args.no_fsync
    root = args.out_dir
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    rows = []
    try:
        t0 = time.perf_counter()
        digests = generate_hf(root / "hf", arch)
        size = sum(p.stat().st_size for p in (root / "hf").glob("*.safetensors"))
        print(f"generated {size / 1e9:.2f} GB ({arch.num_layers} layers) in {time.perf_counter() - t0:.0f}s", flush=True)

        copy_hf = copy_tree(root / "hf", root / "copy", fsync)
        shutil.rmtree(root / "copy")
        res = convert("hf-to-megatron", root / "hf", root / "mg", fsync)
        rows.append(("HF -> Megatron", res, copy_hf))
        print(f"hf -> megatron {res['seconds']:.1f}s (copy {copy_hf:.1f}s)", flush=True)
        shutil.rmtree(root / "hf")  # digests stand in for it: peak disk use 2x, not 3x, the model

        copy_mg = copy_tree(root / "mg", root / "copy", fsync)
        shutil.rmtree(root / "copy")
        res = convert("megatron-to-hf", root / "mg", root / "back", fsync)
        rows.append(("Megatron -> HF", res, copy_mg))
        print(f"megatron -> hf {res['seconds']:.1f}s (copy {copy_mg:.1f}s)", flush=True)
        exact = bit_exact(root / "back", digests)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    print(f"\n{arch.num_layers}-layer {args.preset} shape, {size / 1e9:.2f} GB bf16, fsync={'on' if fsync else 'off'}, "
          f"{os.cpu_count()} CPUs")
    print("| direction | time (s) | plain copy (s) | ratio to copy | peak RSS (GB) |")
    print("|---|---|---|---|---|")
    for name, res, copy in rows:
        print(f"| {name} | {res['seconds']:.1f} | {copy:.1f} | {res['seconds'] / copy:.2f} | "
              f"{res['peak_rss_kb'] / 1024**2:.2f} |")
    print(f"round trip bit-exact: {exact}")
    ok = exact and all(res["seconds"] <= 2 * copy and res["peak_rss_kb"] < 4 * 1024**2 for _, res, copy in rows)
    print("PASS" if ok else "FAIL (bound: <= 2x copy time, < 4 GB peak RSS, bit-exact)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
