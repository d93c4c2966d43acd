"""Time one 64K-token training step of a reduced-depth, full-width Llama-3-8B on one GPU.

STATUS: written for a lent CUDA machine and NOT RUN YET (no GPU was lent in the session
that wrote it; it was only smoke-tested on CPU at toy width with `--smoke`).

Needs only torch with CUDA (no Transformer Engine, no Megatron): the decoder is plain
PyTorch with the exact Llama-3-8B width (hidden 4096, FFN 14336, 32 heads, 8 KV groups,
vocab 128,256, untied, RMSNorm, SwiGLU, RoPE theta 8e6 restarting per document), depth
reduced with --layers. It uses the project's own torch-only pieces: document-masked
attention (`prolong_nemo.model.packed_attention`, SDPA per document -> flash kernels) and
the chunked LM head + cross-entropy (`prolong_nemo.model.cross_entropy`), with activation
checkpointing per layer as in ProLong. One step = forward + backward + AdamW update, bf16.

    python bench/gpu_train_step.py --layers 2 --loss both --out bench/results/gpu_train_step.json

Records tokens/s and peak GPU memory per loss path (an OOM is recorded, not raised) to
--out (JSON) and prints a Markdown table row for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prolong_nemo.model.cross_entropy import chunked_linear_cross_entropy, full_linear_cross_entropy  # noqa: E402
from prolong_nemo.model.config import ROPE_THETA_64K, LlamaArch, preset  # noqa: E402
from prolong_nemo.model.packed_attention import packed_causal_attention  # noqa: E402


def rope_tables(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    freqs = torch.outer(position_ids.float(), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos()[:, None, :], emb.sin()[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Layer(nn.Module):
    def __init__(self, w: LlamaArch):
        super().__init__()
        self.w, self.d = w, w.hidden_size // w.num_attention_heads
        self.attn_norm = nn.RMSNorm(w.hidden_size, eps=w.norm_eps)
        self.qkv = nn.Linear(w.hidden_size, (w.num_attention_heads + 2 * w.num_query_groups) * self.d, bias=False)
        self.o = nn.Linear(w.num_attention_heads * self.d, w.hidden_size, bias=False)
        self.mlp_norm = nn.RMSNorm(w.hidden_size, eps=w.norm_eps)
        self.gate_up = nn.Linear(w.hidden_size, 2 * w.ffn_hidden_size, bias=False)
        self.down = nn.Linear(w.ffn_hidden_size, w.hidden_size, bias=False)

    def forward(self, x, cos, sin, bounds: list[int]):
        t, w, d = x.size(0), self.w, self.d
        q, k, v = self.qkv(self.attn_norm(x)).split([w.num_attention_heads * d, w.num_query_groups * d, w.num_query_groups * d], dim=-1)
        q = apply_rope(q.view(t, w.num_attention_heads, d), cos, sin)
        k = apply_rope(k.view(t, w.num_query_groups, d), cos, sin)
        attn = packed_causal_attention(q, k, v.view(t, w.num_query_groups, d), bounds, 1.0 / math.sqrt(d))
        x = x + self.o(attn.reshape(t, -1))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class Decoder(nn.Module):
    def __init__(self, w: LlamaArch, layers: int):
        super().__init__()
        self.w = w
        self.embed = nn.Embedding(w.vocab_size, w.hidden_size)
        self.layers = nn.ModuleList(Layer(w) for _ in range(layers))
        self.norm = nn.RMSNorm(w.hidden_size, eps=w.norm_eps)
        self.lm_head = nn.Linear(w.hidden_size, w.vocab_size, bias=False)  # untied, as Llama-3-8B

    def hidden_states(self, tokens, position_ids, bounds):
        cos, sin = rope_tables(position_ids, self.w.head_dim, self.w.rope_theta)
        x = self.embed(tokens)
        for layer in self.layers:  # activation checkpointing per decoder layer
            x = checkpoint(layer, x, cos, sin, bounds, use_reentrant=False)
        return self.norm(x)


def packed_documents(tokens: int, vocab: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """A 64K-style row: one long document plus documents of 512..8192 tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths, left = [tokens // 2], tokens - tokens // 2
    while left > 0:
        n = min(int(torch.randint(512, 8193, (1,), generator=g)), left)
        lengths.append(n)
        left -= n
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    ids = torch.randint(1, vocab, (tokens,), generator=g).to(device)
    pos = torch.cat([torch.arange(n) for n in lengths]).to(device)
    return ids, pos, bounds


def step_loss(model: Decoder, ids, pos, bounds, loss: str, chunk: int) -> torch.Tensor:
    h = model.hidden_states(ids, pos, bounds)
    labels = torch.roll(ids, -1)
    if loss == "chunked":
        per_token = chunked_linear_cross_entropy(h, model.lm_head.weight, labels, chunk_tokens=chunk)
    else:
        per_token = full_linear_cross_entropy(h, model.lm_head.weight, labels)
    return per_token.mean()


def measure(args, w: LlamaArch, loss: str, device: str) -> dict:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = Decoder(w, args.layers).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)
    ids, pos, bounds = packed_documents(args.tokens, w.vocab_size, args.seed, device)
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times, value = [], float("nan")
    try:
        for i in range(args.warmup + args.steps):
            if cuda and i == args.warmup:
                torch.cuda.reset_peak_memory_stats()
            sync()
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            value = step_loss(model, ids, pos, bounds, loss, args.chunk)
            value.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError as e:
        return {"loss_path": loss, "status": "OOM", "error": str(e).splitlines()[0]}
    step = min(times)
    return {
        "loss_path": loss, "status": "ok", "step_seconds": step, "tokens_per_second": args.tokens / step,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "loss": float(value), "params": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--loss", choices=("chunked", "full", "both"), default="both")
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/gpu_train_step.json")
    p.add_argument("--smoke", action="store_true", help="toy width on CPU, to check the script runs")
    args = p.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (use --smoke for a toy CPU check)")
    w = preset("llama3-tiny", rope_theta=ROPE_THETA_64K) if args.smoke else preset("llama3-8b", rope_theta=ROPE_THETA_64K)
    paths = ("chunked", "full") if args.loss == "both" else (args.loss,)
    results = []
    for loss in paths:
        results.append(measure(args, w, loss, device))
        if device == "cuda":
            torch.cuda.empty_cache()
    record = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
        "torch": torch.__version__, "width": asdict(w), "args": vars(args), "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    for r in results:
        if r["status"] == "ok":
            mem = f"{r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else "n/a"
            print(f"| {record['device']} | {args.layers} layers, {"toy" if args.smoke else "full"} width | {args.tokens} | {r['loss_path']} CE | "
                  f"{r['tokens_per_second']:,.0f} tokens/s | {mem} |")
        else:
            print(f"| {record['device']} | {args.layers} layers, {"toy" if args.smoke else "full"} width | {args.tokens} | {r['loss_path']} CE | OOM | - |")


if __name__ == "__main__":
    main()
