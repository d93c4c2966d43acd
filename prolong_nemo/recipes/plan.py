"""`prolong-nemo plan <recipe> [overrides]`: check a recipe before anything launches.

Three kinds of checks, each with its reason:
- layout: sequence length vs CP (2*cp chunks per sequence), TP vs heads and KV groups, SP,
  PP vs layers, world size and global batch vs the data-parallel size;
- software: versions the recipe needs (Transformer Engine, cuDNN >= 9.6 for THD + GQA fused
  attention on Hopper, Megatron-Core, Megatron-Bridge for stage chaining);
- memory: a per-GPU estimate (bytes are 1e9 per GB) compared with the GPU's memory.

The memory model (bf16 training, Megatron DDP + distributed optimizer):
  weights     2 B x params held by the GPU (embedding / output layer split over TP, layers
              over TP and PP; the vocabulary padded to a multiple of 128*tp)
  gradients   4 B (fp32 grad buffer, `grad_reduce_in_fp32`) or 2 B x the same params
  optimizer   12 B (fp32 master + Adam m and v) x params, divided by DP x CP when the
              optimizer is distributed (CP ranks hold the same parameters)
  activations per Llama layer and packed token (s = sequence / cp), bf16, flash attention:
              34*s*h bytes / tp with sequence parallelism, s*h*(8 + 26/tp) without (norm and
              linear inputs are replicated across TP without SP). Full recompute keeps each
              layer's input (2*s*h, / tp with SP) plus one layer's activations while it is
              recomputed in the backward pass. With pipeline parallelism the first stage holds
              min(pp, micro-batches) micro-batches in flight (1F1B).
  logits      [s, V/tp] in bf16 plus the fp32 copy the cross-entropy makes (6 B per entry); the
              chunked LM head + cross-entropy only holds `chunk_tokens` rows at a time (the
              recomputed fp32 chunk and its bf16 copy for the gradient GEMMs).
  LM head     its input [s, H] bf16 (the final norm output, all-gathered over TP under sequence
              parallelism), saved for the backward; the input's gradient [s, H] bf16 before the
              reduce-scatter; and the [V/tp, H] bf16 dummy weight gradient handed to autograd
              when the weight gradient went straight into DDP's fp32 `main_grad` (megatron's
              gradient-accumulation-fusion protocol; a fresh allocation per micro-batch). All
              counted as alive at once (an upper bound: the allocator may reuse a freed chunk).
  reserve     4 GB for the CUDA context, NCCL buffers and allocator fragmentation.

Step time (`recipe_cost`): the model FLOPs of a step (`model.flops`: dense GEMMs, causal
attention per document, LM head; training = 3 x forward) from the mixture's expected tokens and
sum of squared document lengths per sample (`data.length_stats`: read from the data, else the
stage's documented default), and the tokens/s/GPU, wall time and GPU-hours this takes at
`model.flops.MFU_BAND` of the GPU's dense peak at the training precision (BF16).

Recipes refuse pipeline parallelism (packed THD rows vary in length; megatron's pipeline p2p
uses fixed shapes): the pp terms above serve what-if estimates only.

Checkpoints (host memory, not GPU): with `checkpoint.optim_reshardable` resolved to true
(megatron's 'fully_reshardable' distributed-optimizer format) every rank gathers the fp32
master weights and both Adam moments of all parameters its TP rank holds, across DP x CP, into
CPU tensors on every save and every load: 12 B x params per GPU per rank (48 GB at 8B TP2),
times the GPUs of a node. The DP-reshardable format saves each rank's own shard in place.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Mapping, Sequence

from prolong_nemo.model.config import LlamaArch
from prolong_nemo.model.flops import GPU_BY_ARCH, StepCost, step_cost
from prolong_nemo.recipes.config import (
    OptimFormat,
    ParallelConfig,
    RecipeConfig,
    RecipeError,
    optim_checkpoint_format,
)

if TYPE_CHECKING:
    from prolong_nemo.data.length_stats import LengthStats

GB = 1e9
RESERVE_BYTES = 4 * GB
VOCAB_DIVISIBLE_BY = 128  # Megatron's make_vocab_size_divisible_by (times tp)

# Minimum versions. cuDNN 9.6 is the first with fused attention for THD + GQA on Hopper.
MIN_CUDNN = (9, 6, 0)
MIN_TE = (2, 14)          # NGC 26.04
# Packed THD + CP. The chunked loss needs no newer one: where GPTModel.forward lacks the
# `output_processor` hook (0.17; 0.18 has it) the forward step runs
# `model.loss.chunked_loss_without_hook`.
MIN_MCORE = (0, 17)
MIN_BRIDGE = (0, 4)       # NGC 26.04
MIN_BRIDGE_CHAIN = (0, 5)  # the on_data_init_start callback event (stage chaining)


# ---------------------------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------------------------
def padded_vocab(vocab_size: int, tp: int) -> int:
    multiple = VOCAB_DIVISIBLE_BY * tp
    return math.ceil(vocab_size / multiple) * multiple


def layer_params(arch: LlamaArch) -> int:
    h, d, g, f = arch.hidden_size, arch.head_dim, arch.num_query_groups, arch.ffn_hidden_size
    qkv = h * (arch.num_attention_heads * d + 2 * g * d)
    proj = arch.num_attention_heads * d * h
    mlp = 3 * h * f  # gate, up, down
    norms = 2 * h
    return qkv + proj + mlp + norms


def total_params(arch: LlamaArch) -> int:
    """Parameters of the model (unpadded vocabulary): 8,030,261,248 for Llama-3-8B."""
    emb = arch.vocab_size * arch.hidden_size
    out = 0 if arch.tie_word_embeddings else emb
    return emb + out + arch.num_layers * layer_params(arch) + arch.hidden_size


def params_per_gpu(arch: LlamaArch, par: ParallelConfig) -> int:
    """Parameters held by the most loaded GPU (first or last pipeline stage)."""
    h, tp = arch.hidden_size, par.tp
    norms = 2 * h
    per_layer = (layer_params(arch) - norms) // tp + norms  # norms are replicated across TP
    layers = (arch.num_layers // par.pp) * per_layer
    emb = padded_vocab(arch.vocab_size, tp) * h // tp
    if par.pp == 1:
        return layers + emb + (0 if arch.tie_word_embeddings else emb) + h
    first = layers + emb
    last = layers + h + emb  # the output layer (a copy of the embedding when tied) + final norm
    return max(first, last)


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU bytes. `logits` is what the configured loss uses (`logits_fp32` + `logits_bf16`);
    both variants are reported. `head_*`: the LM head's other tensors (module docstring)."""

    params: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    logits_unchunked: float
    logits_chunked: float
    logits_fp32: float = 0.0
    logits_bf16: float = 0.0
    head_input: float = 0.0
    head_input_grad: float = 0.0
    head_dummy_wgrad: float = 0.0
    reserve: float = RESERVE_BYTES

    @property
    def total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.activations + self.logits
                + self.head_input + self.head_input_grad + self.head_dummy_wgrad + self.reserve)

    def rows(self) -> list[tuple[str, float]]:
        return [("weights (bf16)", self.weights), ("gradients", self.gradients),
                ("optimizer (fp32 master + Adam)", self.optimizer), ("activations", self.activations),
                ("logits + cross-entropy", self.logits),
                ("LM head input + its gradient (bf16)", self.head_input + self.head_input_grad),
                ("LM head dummy weight gradient (bf16)", self.head_dummy_wgrad),
                ("reserve (context, NCCL, fragmentation)", self.reserve),
                ("total", self.total)]


def layer_activation_bytes(arch: LlamaArch, tokens: int, tp: int, sequence_parallel: bool) -> float:
    """One decoder layer's saved activations for `tokens` local tokens (bf16, flash attention)."""
    h = arch.hidden_size
    g_ratio = arch.num_query_groups / arch.num_attention_heads
    f_ratio = arch.ffn_hidden_size / h
    # bytes per token / h: replicated without SP: two norm inputs + qkv and fc1 inputs (2 B each)
    replicated = 8.0
    # split over TP: q (2), k and v (2 * 2 * groups/heads), attention output (2),
    # fc1 output [2f] (4f/h) and the SwiGLU output [f] (2f/h)
    split = 2 + 4 * g_ratio + 2 + 6 * f_ratio
    if sequence_parallel and tp > 1:
        return tokens * h * (replicated + split) / tp
    return tokens * h * (replicated + split / tp)


def estimate_memory(arch: LlamaArch, par: ParallelConfig, seq_length: int, dp: int, *,
                    loss_impl: str = "chunked", chunk_tokens: int = 2048, microbatches: int = 1) -> MemoryEstimate:
    p = params_per_gpu(arch, par)
    weights = 2.0 * p
    gradients = (4.0 if par.grad_reduce_in_fp32 else 2.0) * p
    optimizer = 12.0 * p / ((dp * par.cp) if par.distributed_optimizer else 1)

    tokens = seq_length // par.cp  # micro-batch of one packed sequence
    h = arch.hidden_size
    layers = arch.num_layers // par.pp
    one_layer = layer_activation_bytes(arch, tokens, par.tp, par.sequence_parallel)
    # 1F1B pipelining: the first stage holds up to pp micro-batches in flight.
    in_flight = min(par.pp, max(microbatches, 1)) if par.pp > 1 else 1
    if par.recompute == "full":
        layer_input = 2.0 * tokens * h / (par.tp if par.sequence_parallel and par.tp > 1 else 1)
        per_layers = max(1, math.ceil(par.recompute_num_layers))
        activations = in_flight * layers / per_layers * layer_input + per_layers * one_layer
    else:  # selective recompute saves little with flash attention: count it as none
        activations = in_flight * layers * one_layer

    vocab_local = padded_vocab(arch.vocab_size, par.tp) // par.tp
    unchunked = 6.0 * tokens * vocab_local
    chunked = 6.0 * min(chunk_tokens, tokens) * vocab_local
    rows = min(chunk_tokens, tokens) if loss_impl == "chunked" else tokens
    head_input = 2.0 * tokens * h  # [s, H] bf16, SP-gathered; its gradient has the same shape
    return MemoryEstimate(params=p, weights=weights, gradients=gradients, optimizer=optimizer,
                          activations=activations, logits=6.0 * rows * vocab_local, logits_unchunked=unchunked,
                          logits_chunked=chunked, logits_fp32=4.0 * rows * vocab_local,
                          logits_bf16=2.0 * rows * vocab_local, head_input=head_input, head_input_grad=head_input,
                          head_dummy_wgrad=2.0 * vocab_local * h)


def recipe_memory(recipe: RecipeConfig) -> MemoryEstimate:
    return estimate_memory(recipe.arch, recipe.parallel, recipe.data.sequence_length,
                           max(recipe.data_parallel_size, 1), loss_impl=recipe.loss.impl,
                           chunk_tokens=recipe.loss.chunk_tokens, microbatches=max(recipe.grad_accumulation, 1))


# ---------------------------------------------------------------------------------------------
# Checkpoints: the distributed optimizer's format and its host memory
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointEstimate:
    """The Adam-state format of a stage's saves and the host memory it costs per save / load."""

    format: OptimFormat
    gather_bytes_per_rank: float  # what the fully reshardable format gathers on each rank
    gpus_per_node: int

    @property
    def reshardable(self) -> bool:
        return self.format.reshardable

    @property
    def gather_bytes_per_node(self) -> float:
        return self.gather_bytes_per_rank * self.gpus_per_node

    @property
    def host_bytes_per_rank(self) -> float:
        return self.gather_bytes_per_rank if self.reshardable else 0.0

    @property
    def host_bytes_per_node(self) -> float:
        return self.host_bytes_per_rank * self.gpus_per_node

    def lines(self) -> list[str]:
        cost = (f"{self.gather_bytes_per_rank / GB:.2f} GB per rank, {self.gather_bytes_per_node / GB:.2f} GB "
                "per node into host memory")
        if self.reshardable:
            return [f"Adam state fully reshardable ({self.format.reason})",
                    f"every save and every load gathers {cost}"]
        return [f"Adam state DP-reshardable ({self.format.reason})",
                f"nothing gathered; fully reshardable would gather {cost} on every save and load"]

    def to_dict(self) -> dict:
        return {"reshardable": self.reshardable, "reason": self.format.reason,
                "host_gb_per_rank": self.host_bytes_per_rank / GB, "host_gb_per_node": self.host_bytes_per_node / GB,
                "gather_gb_per_rank": self.gather_bytes_per_rank / GB}


def checkpoint_estimate(recipe: RecipeConfig) -> CheckpointEstimate:
    """Fully reshardable saves and loads hold fp32 master + Adam m and v of every parameter of
    the TP rank (all DP x CP shards) in CPU tensors on every rank: 12 B x params per GPU."""
    par = recipe.parallel
    gather = 12.0 * params_per_gpu(recipe.arch, par) if par.distributed_optimizer else 0.0
    return CheckpointEstimate(optim_checkpoint_format(recipe), gather, recipe.cluster.gpus_per_node)


def padded_bucket_warning(recipe: RecipeConfig, checkpoint: CheckpointEstimate) -> list[str]:
    """megatron-core (0.17-0.19) saves the fully reshardable format misaligned after a padded
    DDP bucket end: it gathers the buckets without their end padding, then slices with offsets in
    the padded buffer (tests/test_optimizer_checkpoint_format.py). Bucket ends are padded to
    lcm(DP x CP, 128) elements; every Llama parameter size is a multiple of the hidden size, so
    there is no padding when that lcm divides the hidden size (e.g. 4,096 with DP x CP = 2^k)."""
    if not checkpoint.reshardable:
        return []
    dp_cp = max(recipe.data_parallel_size, 1) * recipe.parallel.cp
    divisor = math.lcm(dp_cp, 128)
    if recipe.arch.hidden_size % divisor == 0:
        return []
    return [f"fully reshardable Adam state with DP x CP = {dp_cp}: megatron pads DDP bucket ends to {divisor} "
            f"elements (hidden {recipe.arch.hidden_size}), and its fully reshardable save then stores the states "
            "after a padded bucket end misaligned (another parameter's values); use a power-of-two DP x CP"]


def saved_optimizer_layout(root: str | None) -> tuple[int, int, bool] | None:
    """(tp, pp, fully reshardable) of the distributed-optimizer state in the newest
    Megatron-Bridge checkpoint in `root` (a root with `latest_checkpointed_iteration.txt`, or an
    iteration folder), from the run_config.yaml Bridge writes beside it; None where that is not
    known or there is no such state (no checkpoint yet, a converted HF model, the CPU runner)."""
    from pathlib import Path

    import yaml

    if not root or not Path(root).is_dir():
        return None
    from prolong_nemo.convert.mapping import ConversionError
    from prolong_nemo.convert.megatron_io import bridge_run_config

    try:
        cfg = bridge_run_config(Path(root))
        model, ck = cfg["model"], cfg.get("checkpoint") or {}
        if not ck.get("save_optim") or not (cfg.get("optimizer") or {}).get("use_distributed_optimizer"):
            return None
        return (int(model["tensor_model_parallel_size"]), int(model["pipeline_model_parallel_size"]),
                bool(ck.get("dist_ckpt_optim_fully_reshardable", False)))
    except (ConversionError, OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def chain_problems(recipe: RecipeConfig) -> list[str]:
    """A chained stage (weights + Adam state) whose source checkpoint holds Adam state in the
    DP-reshardable format at another tp / pp: Megatron-Bridge would refuse it at load time."""
    ck, par = recipe.checkpoint, recipe.parallel
    if ck.init != "weights_and_optimizer" or not par.distributed_optimizer:
        return []
    saved = saved_optimizer_layout(ck.init_from)
    if saved is None or saved[2] or saved[:2] == (par.tp, par.pp):
        return []
    return [f"checkpoint.init_from={ck.init_from} holds DP-reshardable Adam state saved at tp={saved[0]} "
            f"pp={saved[1]}, which this stage cannot load at tp={par.tp} pp={par.pp}: run it at tp={saved[0]} "
            f"pp={saved[1]}, or save the previous stage again with checkpoint.optim_reshardable=true"]


# ---------------------------------------------------------------------------------------------
# Software versions
# ---------------------------------------------------------------------------------------------
def parse_version(text: str | None) -> tuple[int, ...] | None:
    """The leading release numbers: "2.16.0+cu13" -> (2, 16, 0), "0.19.0rc1" -> (0, 19, 0)."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", str(text)) if text else None
    return tuple(int(p) for p in match.group(1).split(".")) if match else None


def cudnn_version_tuple(number: int | None) -> tuple[int, int, int] | None:
    """torch.backends.cudnn.version(): 90600 -> (9, 6, 0) (cuDNN >= 9 encodes major*10000)."""
    if not number:
        return None
    if number >= 10000:
        return number // 10000, (number % 10000) // 100, number % 100
    return number // 1000, (number % 1000) // 100, number % 100  # cuDNN 8: major*1000


def _dist_version(*names: str) -> str | None:
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def detect_environment() -> dict[str, object]:
    """Installed versions, read from package metadata (nothing heavy is imported)."""
    env: dict[str, object] = {
        "megatron-core": _dist_version("megatron-core", "megatron_core"),
        "megatron-bridge": _dist_version("megatron-bridge", "megatron_bridge"),
        "transformer-engine": _dist_version("transformer_engine", "transformer-engine",
                                            "transformer-engine-cu12", "transformer-engine-cu13"),
        "torch": _dist_version("torch"),
        "cudnn": None,
        "gpu": None,
    }
    try:
        import torch

        if torch.cuda.is_available():
            env["cudnn"] = ".".join(map(str, cudnn_version_tuple(torch.backends.cudnn.version()) or ())) or None
            major, minor = torch.cuda.get_device_capability()
            env["gpu"] = f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
    except Exception:  # no CUDA runtime: a login node or CPU machine
        pass
    return env


@dataclass(frozen=True)
class Requirement:
    name: str
    minimum: tuple[int, ...]
    why: str


def requirements(recipe: RecipeConfig) -> list[Requirement]:
    if recipe.cluster.gpu_memory_gb <= 0:  # a CPU recipe: the CPU runner needs megatron-core only
        return [Requirement("megatron-core", MIN_MCORE, "packed THD sequences on the CPU runner")]
    reqs = [
        Requirement("megatron-core", MIN_MCORE, "packed THD sequences with context parallelism"),
        Requirement("transformer-engine", MIN_TE, "fused THD attention and context parallelism"),
        Requirement("megatron-bridge", MIN_BRIDGE_CHAIN if recipe.checkpoint.init == "weights_and_optimizer"
                    else MIN_BRIDGE,
                    "on_data_init_start callback to restart the schedule after loading the previous stage"
                    if recipe.checkpoint.init == "weights_and_optimizer" else "pretrain() entry"),
    ]
    arch = recipe.arch
    if recipe.cluster.gpu_arch == "hopper" and arch.num_query_groups < arch.num_attention_heads:
        reqs.append(Requirement("cudnn", MIN_CUDNN, "cuDNN fused attention with THD + GQA on Hopper"))
    return reqs


def version_checks(recipe: RecipeConfig, env: Mapping[str, object], strict: bool) -> tuple[list[str], list[str]]:
    """(errors, warnings). Missing packages are errors only with `strict` (on the training nodes)."""
    errors, warnings = [], []
    for req in requirements(recipe):
        have = parse_version(env.get(req.name))  # type: ignore[arg-type]
        need = ".".join(map(str, req.minimum))
        if have is None:
            msg = f"{req.name} >= {need} needed ({req.why}); not found here"
            (errors if strict else warnings).append(msg + ("" if strict else ": check it in the container"))
        elif have < req.minimum:
            errors.append(f"{req.name} {env.get(req.name)} is older than {need} ({req.why})")
    return errors, warnings


# ---------------------------------------------------------------------------------------------
# Step time: model FLOPs from the mixture's document lengths (model/flops.py), MFU band
# ---------------------------------------------------------------------------------------------
def recipe_cost(recipe: RecipeConfig) -> tuple[LengthStats | None, StepCost | None]:
    """The mixture's length statistics (read from the data, else the stage's default) and the
    step cost on the recipe's GPUs; (None, None) for a CPU recipe (no GPU to time)."""
    gpu = GPU_BY_ARCH.get(recipe.cluster.gpu_arch)
    if recipe.cluster.gpu_memory_gb <= 0 or gpu is None:
        return None, None
    if gpu == "H100-SXM" and recipe.cluster.gpu_memory_gb > 100:
        gpu = "H200-SXM"  # 141 GB
    from prolong_nemo.data.length_stats import length_stats

    d = recipe.data
    lengths = length_stats(d.domain_paths(), stage=recipe.stage, sequence_length=d.sequence_length,
                           document_masking=d.document_masking)
    return lengths, step_cost(recipe.arch, tokens_per_sample=lengths.tokens, sum_sq_per_sample=lengths.sum_sq,
                              samples_per_step=recipe.train.global_batch_size, steps=recipe.train.steps,
                              gpus=recipe.cluster.world_size, gpu=gpu, recompute=recipe.parallel.recompute,
                              lm_head_recompute=recipe.loss.impl == "chunked")


def cost_lines(lengths: LengthStats | None, cost: StepCost | None) -> list[str]:
    if lengths is None or cost is None:
        return []
    first, *rest = cost.lines()
    return [f"  lengths      {lengths.detail}: {lengths.tokens:,.0f} tokens, sum l^2 {lengths.sum_sq:.3e} per "
            f"sample (mean document {lengths.mean_doc_length:,.0f} tokens)",
            f"  step cost    {first}"] + [f"               {line}" for line in rest]


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------
@dataclass
class Plan:
    recipe: RecipeConfig
    memory: MemoryEstimate | None
    checkpoint: CheckpointEstimate | None = None
    lengths: LengthStats | None = None  # expected document-length moments per sample
    cost: StepCost | None = None  # model FLOPs per step and time under the MFU band
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    environment: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def report(self) -> str:
        r, par = self.recipe, self.recipe.parallel
        lines = [
            f"recipe {r.name} (stage {r.stage}): {r.arch.num_layers} layers, hidden {r.arch.hidden_size}, "
            f"rope_theta {r.arch.rope_theta:g}",
            f"  cluster      {r.cluster.nodes} node(s) x {r.cluster.gpus_per_node} GPU(s), "
            f"{r.cluster.gpu_memory_gb:g} GB each",
            f"  layout       tp={par.tp} pp={par.pp} cp={par.cp} dp={r.data_parallel_size} "
            f"sp={'on' if par.sequence_parallel else 'off'} recompute={par.recompute} "
            f"distributed_optimizer={'on' if par.distributed_optimizer else 'off'}",
            f"  batch        {r.train.global_batch_size} x {r.data.sequence_length:,} tokens = "
            f"{r.tokens_per_step:,} tokens/step, {r.grad_accumulation} micro-batches per GPU per step",
            f"  schedule     {r.train.steps} steps ({r.total_tokens / 1e9:.2f}B tokens), LR {r.optim.lr:g} -> "
            f"{r.optim.min_lr:g} cosine, warmup {r.warmup_steps}",
        ]
        if self.memory is not None:
            m = self.memory
            lines.append(f"  memory per GPU ({m.params / 1e9:.3f}B parameters on the most loaded GPU):")
            lines += [f"    {name:<40} {value / GB:8.2f} GB" for name, value in m.rows()]
            lines.append(f"    (logits without chunking {m.logits_unchunked / GB:.2f} GB, "
                         f"chunked {m.logits_chunked / GB:.2f} GB)")
        if self.checkpoint is not None:
            first, second = self.checkpoint.lines()
            lines += [f"  checkpoint   {first}", f"               {second}"]
        lines += cost_lines(self.lengths, self.cost)
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        for e in self.errors:
            lines.append(f"  REFUSED: {e}")
        lines.append("  plan OK" if self.ok else "  plan REFUSED")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"recipe": self.recipe.name, "ok": self.ok, "errors": self.errors, "warnings": self.warnings,
                "memory_gb": None if self.memory is None else
                {k: (v / GB if isinstance(v, float) else v) for k, v in asdict(self.memory).items()}
                | {"total": self.memory.total / GB},
                "checkpoint": None if self.checkpoint is None else self.checkpoint.to_dict(),
                "environment": self.environment,
                "lengths": None if self.lengths is None else self.lengths.to_dict(),
                "cost": None if self.cost is None else self.cost.to_dict()}


def make_plan(recipe: RecipeConfig, *, env: Mapping[str, object] | None = None, strict_env: bool = False) -> Plan:
    env = dict(detect_environment() if env is None else env)
    plan = Plan(recipe=recipe, memory=None, environment=env)
    plan.errors += recipe.problems()
    if plan.errors:
        return plan  # an inconsistent layout has no meaningful memory estimate
    plan.memory = recipe_memory(recipe)
    plan.lengths, plan.cost = recipe_cost(recipe)
    try:
        plan.checkpoint = checkpoint_estimate(recipe)
        plan.warnings += padded_bucket_warning(recipe, plan.checkpoint)
    except RecipeError as e:
        plan.errors.append(str(e))
    plan.errors += chain_problems(recipe)
    capacity = recipe.cluster.gpu_memory_gb * GB
    if capacity > 0 and plan.memory.total > capacity:
        plan.errors.append(
            f"estimated {plan.memory.total / GB:.1f} GB per GPU exceeds {recipe.cluster.gpu_memory_gb:g} GB: "
            "raise tp or cp, enable sequence parallelism, the distributed optimizer, full recompute "
            "or the chunked loss")
    errors, warnings = version_checks(recipe, env, strict_env)
    plan.errors += errors
    plan.warnings += warnings
    return plan


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def verdict_line(plan: Plan) -> str:
    """One line per sweep point: OK with memory and expected throughput, or the first refusal."""
    if not plan.ok:
        more = f" (+{len(plan.errors) - 1} more)" if len(plan.errors) > 1 else ""
        return f"REFUSED: {plan.errors[0]}{more}"
    parts = ["OK", f"{plan.memory.total / GB:.1f} GB/GPU of {plan.recipe.cluster.gpu_memory_gb:g}"]
    if plan.cost is not None:
        low, high = plan.cost.band()["tokens_per_s_per_gpu"]
        parts.append(f"{low:,.0f}-{high:,.0f} tokens/s/GPU")
    return " | ".join(parts)


def sweep_points(overrides: Sequence[str]) -> list[list[str]]:
    """Hydra's multirun expansion of `overrides` (`parallel.tp=1,2 parallel.cp=1,2,4`: 6 points),
    parsed by Hydra's own override grammar (choice sweeps, `range(...)`, quoting)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    axes = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if override.is_sweep_override():
            key = f"{override.get_key_element()}="
            axes.append([key + value for value in override.sweep_string_iterator()])
        else:
            axes.append([override.input_line])
    return [list(point) for point in itertools.product(*axes)]


def print_job_config(recipe: RecipeConfig) -> None:
    """`--cfg job` (Hydra's convention): the composed, resolved recipe as YAML."""
    print(f"# recipe {recipe.name}, composed and resolved (what `plan`, `train` and `launch` read)")
    print(recipe.to_yaml(), end="")
    print(f"# the Megatron-Bridge ConfigContainer it builds, flattened: prolong-nemo train {recipe.name} --cfg job")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = "Check a recipe's layout, software versions and per-GPU memory before launching."
    parser.add_argument("recipe", help="recipe name in recipes/ (stage_64k, stage_512k, sft, *_cpu) or a YAML path")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. parallel.cp=8 optim.lr=1e-5")
    parser.add_argument("--strict-env", action="store_true",
                        help="treat missing TE / cuDNN / Bridge as errors (run this on the training nodes)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--cfg", choices=("job",), help="print the composed recipe (Hydra's --cfg job) instead of a plan")
    parser.add_argument("-m", "--multirun", action="store_true",
                        help="sweep: `parallel.tp=1,2 parallel.cp=1,2,4` plans every point, one verdict line each")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prolong_nemo.recipes.stages import load_recipe

    if args.multirun:
        return run_sweep(args)
    try:
        recipe = load_recipe(args.recipe, args.overrides, validate=False)
    except RecipeError as e:
        print(f"plan REFUSED: {e}", file=sys.stderr)
        return 2
    if args.cfg == "job":
        print_job_config(recipe)
        return 0
    plan = make_plan(recipe, strict_env=args.strict_env)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.report())
    return 0 if plan.ok else 1


def run_sweep(args: argparse.Namespace) -> int:
    from prolong_nemo.recipes.stages import load_recipe

    if args.cfg or args.json:
        raise RecipeError("plan -m prints one verdict line per point: without --cfg / --json")
    try:
        points = sweep_points(args.overrides)
    except Exception as e:  # Hydra's grammar errors (hydra.errors.OverrideParseException)
        raise RecipeError(f"plan -m: {' '.join(str(e).split())}") from None
    environment, refused = detect_environment(), 0
    for point in points:
        label = " ".join(point) or "(no overrides)"
        try:
            plan = make_plan(load_recipe(args.recipe, point, validate=False), env=environment,
                             strict_env=args.strict_env)
            line = verdict_line(plan)
            refused += not plan.ok
        except RecipeError as e:
            line, refused = f"REFUSED: {e}", refused + 1
        print(f"{label}: {line}")
    print(f"{len(points) - refused} of {len(points)} points OK")
    return 0 if not refused else 1
