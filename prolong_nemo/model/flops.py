"""FLOP cost model of a Llama decoder on packed, document-masked samples.

Pure functions of a `LlamaArch` and document lengths (no torch, no megatron: the planner and
the data-parallel balancer import it anywhere). Counting convention: a multiply-add is 2 FLOPs,
so a GEMM [m, k] x [k, n] costs 2*m*k*n; elementwise work (norms, RoPE, SwiGLU's product,
softmax, the loss) is not counted.

Notation: H hidden size, L layers, n_h query heads, g KV groups, d = H / n_h head dim,
F ffn hidden size, V vocabulary, q = n_h*d (query width), kv = 2*g*d (key + value width).

Forward FLOPs of one packed sample whose documents have lengths l_1..l_n (T = sum l_i tokens):

  dense      per token 2 * L * (H*(q + kv)  QKV projection
                              + q*H        attention output projection
                              + 3*H*F)     SwiGLU: gate, up and down projections
             = 2 x the non-embedding matmul weights (norm weights are elementwise)
  attention  document masking: a token attends to the earlier tokens of its own document and
             to itself, so document l holds l(l+1)/2 query-key pairs per head (causal = half of
             the full l^2, plus the diagonal). Each pair costs 2*d for its QK^T score and 2*d
             for its share of softmax(QK^T) V, for each of the n_h query heads (GQA shares K and V
             between heads, it does not remove work):
               per layer  4 * d * n_h * l(l+1)/2 = 2 * q * (l^2 + l)
               sample     2 * L * q * (sum l^2 + T)
             Without document masking the whole sample is one document (sum l^2 = T^2).
  lm head    per token 2 * H * V (the embedding is a lookup: no FLOPs)

So a sample's cost needs only T and sum l^2 (`forward_flops_from_moments`): the planner passes
expected values over a mixture (`prolong_nemo.data.length_stats`), the data-parallel balancer
passes one sample's document lengths (`sample_cost`).

Training (model FLOPs, the MFU convention): backward = 2 x forward for every GEMM (the
gradients of the input and of the weight) and for attention (dQ, dK from dS, dV and dP), so
training = 3 x forward; no recompute is counted. What the GPU really executes (hardware FLOPs)
adds what is recomputed (`training_flops(..., recompute=...)`):
  full       megatron's full activation recompute: one more forward of the decoder layers
             (dense + attention), not of the LM head;
  selective  megatron's selective recompute of core attention: one more attention forward;
  lm_head_recompute  the chunked LM head + cross-entropy (`model.cross_entropy`) recomputes
             each chunk's logits in the backward: one more LM-head forward.
Flash attention's backward also recomputes QK^T internally (half an attention forward); that is
kernel work, left out of both counts (as megatron's own MFU count leaves it out).

Time (`step_cost`): step seconds = model FLOPs per step / (MFU x dense peak x GPUs), over the
band `MFU_BAND` of the GPU's dense tensor-core peak at the training precision (`GPU_PEAKS`,
from NVIDIA's datasheets); tokens/s/GPU, stage wall time and GPU-hours follow from it. The MFU
of a published run already absorbs its recompute and communication, so no layout term is added.

Checked against an independent count: `torch.utils.flop_counter.FlopCounterMode` on Hugging
Face's LlamaForCausalLM and on plain per-document attention (tests/test_flops.py), and against
Megatron-Bridge's published Llama-3-8B model TFLOP/s, which this count reproduces from the
published tokens/s (tests/test_plan.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from prolong_nemo.model.config import LlamaArch

RECOMPUTE_MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class Flops:
    """FLOPs split by term, so a caller can say what dominates."""

    dense: float = 0.0
    attention: float = 0.0
    lm_head: float = 0.0

    @property
    def total(self) -> float:
        return self.dense + self.attention + self.lm_head

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.dense + other.dense, self.attention + other.attention, self.lm_head + other.lm_head)

    def __mul__(self, factor: float) -> Flops:
        return Flops(self.dense * factor, self.attention * factor, self.lm_head * factor)

    __rmul__ = __mul__

    def terms(self) -> dict[str, float]:
        return {"dense": self.dense, "attention": self.attention, "lm_head": self.lm_head}

    def shares(self) -> dict[str, float]:
        total = self.total or 1.0
        return {name: value / total for name, value in self.terms().items()}

    @property
    def dominant(self) -> str:
        """The largest term: "dense", "attention" or "lm_head"."""
        terms = self.terms()
        return max(terms, key=terms.__getitem__)


def layer_gemm_weights(arch: LlamaArch) -> int:
    """Matmul weights of one decoder layer: QKV, attention output, SwiGLU gate/up/down."""
    q = arch.num_attention_heads * arch.head_dim
    kv = 2 * arch.num_query_groups * arch.head_dim
    return arch.hidden_size * (q + kv) + q * arch.hidden_size + 3 * arch.hidden_size * arch.ffn_hidden_size


def dense_flops_per_token(arch: LlamaArch) -> float:
    """Forward FLOPs of the decoder layers' GEMMs for one token: 2 x their weights."""
    return 2.0 * arch.num_layers * layer_gemm_weights(arch)


def lm_head_flops_per_token(arch: LlamaArch) -> float:
    """Forward FLOPs of the output layer for one token: 2 * H * V."""
    return 2.0 * arch.hidden_size * arch.vocab_size


def attention_flops_from_moments(arch: LlamaArch, tokens: float, sum_sq: float, *, causal: bool = True) -> float:
    """Forward FLOPs of QK^T and AV for documents with sum l = `tokens`, sum l^2 = `sum_sq`.

    causal: 2*L*q*(sum l^2 + sum l) (l(l+1)/2 pairs per document); `causal=False` counts every
    query against every key of its document (l^2 pairs), as a dense attention kernel computes.
    """
    q = arch.num_attention_heads * arch.head_dim
    pairs2 = sum_sq + tokens if causal else 2.0 * sum_sq  # 2 x query-key pairs
    return 2.0 * arch.num_layers * q * pairs2


def forward_flops_from_moments(arch: LlamaArch, tokens: float, sum_sq: float) -> Flops:
    """Forward FLOPs of a sample of `tokens` tokens whose document lengths have sum of squares `sum_sq`."""
    return Flops(dense=tokens * dense_flops_per_token(arch),
                 attention=attention_flops_from_moments(arch, tokens, sum_sq),
                 lm_head=tokens * lm_head_flops_per_token(arch))


def length_moments(doc_lengths: Iterable[int]) -> tuple[float, float]:
    """(sum l, sum l^2) of document lengths (a list, tuple or array of lengths)."""
    if not isinstance(doc_lengths, (np.ndarray, list, tuple)):
        doc_lengths = list(doc_lengths)
    lengths = np.asarray(doc_lengths, dtype=np.float64).reshape(-1)
    if (lengths < 0).any():
        raise ValueError(f"document lengths must be >= 0, got {lengths[lengths < 0][0]:g}")
    return float(lengths.sum()), float((lengths * lengths).sum())


def lengths_from_cu_seqlens(cu_seqlens: Iterable[int]) -> list[int]:
    """Document lengths from cumulative offsets [0, l_1, l_1 + l_2, ...] (THD `cu_seqlens`)."""
    offsets = [int(x) for x in cu_seqlens]
    lengths = [b - a for a, b in pairwise(offsets)]
    if any(length < 0 for length in lengths):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {offsets}")
    return lengths


def forward_flops(arch: LlamaArch, doc_lengths: Iterable[int]) -> Flops:
    """Forward FLOPs of one packed sample from its document lengths."""
    return forward_flops_from_moments(arch, *length_moments(doc_lengths))


def training_from_forward(forward: Flops, *, recompute: str = "none", lm_head_recompute: bool = False) -> Flops:
    """Training FLOPs from forward FLOPs: 3 x forward, plus what `recompute` runs again."""
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
    again = Flops(dense=forward.dense if recompute == "full" else 0.0,
                  attention=forward.attention if recompute in ("full", "selective") else 0.0,
                  lm_head=forward.lm_head if lm_head_recompute else 0.0)
    return 3 * forward + again


def training_flops(arch: LlamaArch, doc_lengths: Iterable[int], *, recompute: str = "none",
                   lm_head_recompute: bool = False) -> Flops:
    """Training FLOPs of one packed sample (forward + backward, plus any recompute)."""
    return training_from_forward(forward_flops(arch, doc_lengths), recompute=recompute,
                                 lm_head_recompute=lm_head_recompute)


def sample_cost(arch: LlamaArch, doc_lengths: Iterable[int]) -> float:
    """Model training FLOPs (3 x forward, no recompute) of one packed sample.

    `doc_lengths`: the lengths of the sample's documents (use `lengths_from_cu_seqlens` for THD
    offsets); pass the padded lengths to count CP padding. Linear in sum l and sum l^2, so the
    cost of several samples on one rank is the sum of their costs. As the balancer's
    `cost(segment_lengths)`: `functools.partial(sample_cost, arch)`.
    """
    return training_flops(arch, doc_lengths).total


def flops_per_token(arch: LlamaArch, tokens: float, sum_sq: float) -> float:
    """Model training FLOPs per token of a sample with these moments."""
    return training_from_forward(forward_flops_from_moments(arch, tokens, sum_sq)).total / max(tokens, 1.0)


# ---------------------------------------------------------------------------------------------
# From FLOPs to time: dense tensor-core peaks and the MFU band
# ---------------------------------------------------------------------------------------------
TERA = 1e12


@dataclass(frozen=True)
class GpuPeak:
    """Dense (no 2:4 sparsity) tensor-core peaks in FLOP/s."""

    name: str
    bf16: float
    fp8: float | None

    def peak(self, precision: str = "bf16") -> float:
        value = {"bf16": self.bf16, "fp8": self.fp8}.get(precision)
        if value is None:
            raise ValueError(f"{self.name} has no {precision} tensor-core peak")
        return value


# NVIDIA datasheets quote tensor-core peaks with 2:4 sparsity; the dense peak is half of it.
# H100 SXM: BF16 1,979 / FP8 3,958 TFLOPS sparse (https://www.nvidia.com/en-us/data-center/h100/)
# H200 SXM: the same tensor cores and figures (https://www.nvidia.com/en-us/data-center/h200/)
# A100 SXM: BF16 312 TFLOPS dense, 624 sparse; no FP8 (A100 datasheet,
#   https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf)
# B200 (HGX B200, 8 GPUs): BF16 36 / FP8 72 PFLOPS sparse, i.e. 2.25 / 4.5 PFLOPS dense per GPU
#   (https://www.nvidia.com/en-us/data-center/hgx/)
GPU_PEAKS: dict[str, GpuPeak] = {
    "H100-SXM": GpuPeak("H100-SXM", 989.4 * TERA, 1978.9 * TERA),
    "H200-SXM": GpuPeak("H200-SXM", 989.4 * TERA, 1978.9 * TERA),
    "A100-SXM": GpuPeak("A100-SXM", 312.0 * TERA, None),
    "B200": GpuPeak("B200", 2250.0 * TERA, 4500.0 * TERA),
}
# `cluster.gpu_arch` -> the GPU assumed (H100 and H200 share their peaks).
GPU_BY_ARCH = {"hopper": "H100-SXM", "ampere": "A100-SXM", "blackwell": "B200"}

# Model FLOPs utilization assumed for Megatron-Core + Transformer Engine training, as a fraction
# of the dense peak at the training precision. Evidence:
# - Megatron-Bridge performance summary (NeMo 25.11 container, DGX-H100,
#   https://github.com/NVIDIA-NeMo/Megatron-Bridge/blob/main/docs/performance-summary.md):
#   LLAMA3_8B, 8 GPUs, FP8-CS, GBS 128, MBS 1, seq 8192: 14,451 tokens/s/GPU, 744 model
#   TFLOP/s/GPU = 37.6% of the H100's dense FP8 peak (75% of its BF16 peak: FP8 GEMMs).
# - NeMo long-sequence performance (Llama-2-7B, FP8, H100, context parallel,
#   https://docs.nvidia.com/nemo-framework/user-guide/24.12/nemotoolkit/performance/performance_long_sequence.html):
#   574 TFLOP/s/GPU at 64K (CP2) and 549 at 512K (CP16): 55-58% of the BF16 peak, where
#   attention (run in BF16) is most of the work.
# Our recipes train in BF16 with document masking (short documents: less efficient attention
# tiles) and TP2 / CP4 communication, so the band sits below those figures.
MFU_BAND = (0.30, 0.50)


@dataclass(frozen=True)
class StepCost:
    """Model FLOPs of one optimizer step and the time they take under an MFU band."""

    per_step: Flops  # model training FLOPs of all samples of one step
    hardware_per_step: Flops  # with the recipe's recompute
    tokens_per_step: float
    steps: int
    gpus: int
    gpu: GpuPeak
    precision: str = "bf16"
    mfu: tuple[float, float] = MFU_BAND

    @property
    def peak(self) -> float:
        return self.gpu.peak(self.precision)

    def step_seconds(self, mfu: float) -> float:
        return self.per_step.total / (mfu * self.peak * self.gpus)

    def tokens_per_s_per_gpu(self, mfu: float) -> float:
        return self.tokens_per_step / self.step_seconds(mfu) / self.gpus

    def wall_seconds(self, mfu: float) -> float:
        return self.steps * self.step_seconds(mfu)

    def gpu_hours(self, mfu: float) -> float:
        return self.wall_seconds(mfu) * self.gpus / 3600.0

    def band(self) -> dict[str, tuple[float, float]]:
        """(at the high MFU, at the low MFU) for every time; (low, high) for throughput."""
        lo, hi = self.mfu
        return {"step_seconds": (self.step_seconds(hi), self.step_seconds(lo)),
                "tokens_per_s_per_gpu": (self.tokens_per_s_per_gpu(lo), self.tokens_per_s_per_gpu(hi)),
                "wall_hours": (self.wall_seconds(hi) / 3600.0, self.wall_seconds(lo) / 3600.0),
                "gpu_hours": (self.gpu_hours(hi), self.gpu_hours(lo))}

    def lines(self) -> list[str]:
        f, lo, hi = self.per_step, *self.mfu
        b = self.band()
        shares = ", ".join(f"{name} {100 * s:.0f}%" for name, s in f.shares().items())
        return [
            (f"model FLOPs per step {f.total:.3e} ({shares}; {f.dominant} dominates), "
             f"{f.total / max(self.tokens_per_step, 1):.3e} per token"),
            f"hardware FLOPs per step {self.hardware_per_step.total:.3e} (with recompute)",
            (f"at {100 * lo:.0f}-{100 * hi:.0f}% MFU of {self.gpu.name} {self.precision} dense peak "
             f"{self.peak / TERA:.0f} TFLOP/s: {b['tokens_per_s_per_gpu'][0]:,.0f}-"
             f"{b['tokens_per_s_per_gpu'][1]:,.0f} tokens/s/GPU, {b['step_seconds'][0]:.1f}-"
             f"{b['step_seconds'][1]:.1f} s/step"),
            (f"stage ({self.steps} steps on {self.gpus} GPUs): {b['wall_hours'][0]:.1f}-{b['wall_hours'][1]:.1f} h "
             f"wall, {b['gpu_hours'][0]:,.0f}-{b['gpu_hours'][1]:,.0f} GPU-hours"),
        ]

    def to_dict(self) -> dict:
        return {"model_flops_per_step": self.per_step.total, "terms": self.per_step.terms(),
                "dominant": self.per_step.dominant, "hardware_flops_per_step": self.hardware_per_step.total,
                "gpu": self.gpu.name, "precision": self.precision, "peak_tflops": self.peak / TERA,
                "mfu_band": list(self.mfu)} | {k: list(v) for k, v in self.band().items()}


def step_cost(arch: LlamaArch, *, tokens_per_sample: float, sum_sq_per_sample: float, samples_per_step: int,
              steps: int, gpus: int, gpu: str | GpuPeak = "H100-SXM", precision: str = "bf16",
              recompute: str = "none", lm_head_recompute: bool = False,
              mfu: tuple[float, float] = MFU_BAND) -> StepCost:
    """A step's model FLOPs from a sample's expected sum l and sum l^2, and its time band."""
    forward = forward_flops_from_moments(arch, tokens_per_sample, sum_sq_per_sample) * samples_per_step
    peak = gpu if isinstance(gpu, GpuPeak) else GPU_PEAKS[gpu]
    return StepCost(per_step=training_from_forward(forward),
                    hardware_per_step=training_from_forward(forward, recompute=recompute,
                                                            lm_head_recompute=lm_head_recompute),
                    tokens_per_step=tokens_per_sample * samples_per_step, steps=steps, gpus=gpus, gpu=peak,
                    precision=precision, mfu=mfu)
