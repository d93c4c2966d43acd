"""Throughput of `data tokenize` and `data pack` on the offline stdlib corpus.

    .venv/bin/python bench/bench_pack.py [--chars 4000000] [--workers 1 2] [--pack-length 65536]

Tokenize is timed after the imports (torch, pulled in by mosaicml-streaming, costs seconds once);
pack is timed on the tokenized output with and without split lengths, and on a synthetic
stream of long documents where buffer handling, not MDS decoding, dominates.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from prolong_nemo.data.corpus import build_corpus
from prolong_nemo.data.packer import Document, PackOptions, pack_documents, pack_mds
from prolong_nemo.data.tokenize import TokenizeOptions, tokenize_files


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=4_000_000, help="characters per corpus domain")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--pack-length", type=int, default=65536)
    args = parser.parse_args()
    import streaming  # noqa: F401  (import cost outside the timings)

    tmp = Path(tempfile.mkdtemp(prefix="bench_pack_"))
    files = build_corpus(tmp / "corpus", max_chars_per_domain=args.chars, max_dialogues=2000)
    chars = sum(p.stat().st_size for p in files.pretraining)
    for workers in args.workers:
        out = tmp / f"raw{workers}"
        stats, sec = timed(lambda: tokenize_files(list(files.pretraining), out, TokenizeOptions(workers=workers),
                                                  progress=False))
        print(f"tokenize  workers={workers}: {stats.documents_out} docs, {stats.tokens_out} tokens, "
              f"{chars / 1e6:.1f} MB in {sec:.2f}s = {stats.tokens_out / sec / 1e6:.2f}M tokens/s")
    raw = tmp / f"raw{args.workers[0]}"
    L = args.pack_length
    for name, opts in [("plain", PackOptions(pack_length=L, bos_id=128000, eos_id=128001)),
                       ("split", PackOptions(pack_length=L, split_lengths=(L, 1024), bos_id=128000,
                                             eos_id=128001, split_by_domain=True))]:
        stats, sec = timed(lambda: pack_mds([raw], tmp / f"packed_{name}", opts, progress=False))
        print(f"pack mds  {name}: {stats.tokens_in} tokens in {sec:.2f}s = {stats.tokens_in / sec / 1e6:.2f}M "
              f"tokens/s, samples {stats.samples_out}")
    rng = np.random.default_rng(0)
    docs = [Document(rng.integers(0, 128000, int(n), dtype=np.uint32), "long")
            for n in rng.integers(1, 4 * L, 200)]
    (samples, stats), sec = timed(lambda: pack_documents(docs, PackOptions(pack_length=L, mos_id=128000)))
    print(f"pack mem  long docs: {stats.tokens_in} tokens in {sec:.2f}s = {stats.tokens_in / sec / 1e6:.1f}M "
          f"tokens/s, {len(samples)} samples")
    print(f"(scratch: {tmp})")


if __name__ == "__main__":
    main()
