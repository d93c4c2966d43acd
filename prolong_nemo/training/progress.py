"""The progress log both backends print: progress, ETA, tokens/s, model TFLOP/s per GPU,
memory, lm loss."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from prolong_nemo.model.config import LlamaArch
from prolong_nemo.recipes.config import RecipeConfig


def model_flops_per_token(arch: LlamaArch, seq_length: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward), no recompute counted.

    Forward: 2 x every matmul weight (the embedding is a lookup) plus causal attention over
    the packed sequence, 2 x 2 x h per layer and attended position, s/2 positions on average.
    Document masking skips cross-document blocks, so this is the nominal (upper) count.
    """
    h, f, g, d, L = (arch.hidden_size, arch.ffn_hidden_size, arch.num_query_groups, arch.head_dim,
                     arch.num_layers)
    per_layer = h * (arch.num_attention_heads * d + 2 * g * d) + arch.num_attention_heads * d * h + 3 * h * f
    matmul = L * per_layer + arch.vocab_size * h
    attention = L * 4 * h * (seq_length / 2)
    return 3 * (2 * matmul + attention)


@dataclass
class ProgressMeter:
    total_steps: int
    tokens_per_step: int
    flops_per_step: float
    world_size: int
    started: float = 0.0
    first_step: int | None = None

    @classmethod
    def for_recipe(cls, recipe: RecipeConfig, world_size: int | None = None) -> "ProgressMeter":
        return cls(total_steps=recipe.train.steps, tokens_per_step=recipe.tokens_per_step,
                   flops_per_step=model_flops_per_token(recipe.arch, recipe.data.sequence_length)
                   * recipe.tokens_per_step,
                   world_size=world_size or max(recipe.cluster.world_size, 1))

    def line(self, step: int, loss: float, step_seconds: float, memory_bytes: float | None,
             lr: float | None = None, now: float | None = None) -> str:
        """One log line after optimizer step `step` (1-based) that took `step_seconds`."""
        now = time.perf_counter() if now is None else now
        if self.first_step is None:  # the ETA uses the steps done by this process
            self.first_step, self.started = step - 1, now - step_seconds
        done = max(step - self.first_step, 1)
        eta = (now - self.started) / done * max(self.total_steps - step, 0)
        tokens_s = self.tokens_per_step / step_seconds if step_seconds > 0 else float("nan")
        tflops = self.flops_per_step / step_seconds / self.world_size / 1e12 if step_seconds > 0 else float("nan")
        parts = [f"step {step}/{self.total_steps} ({100.0 * step / self.total_steps:.1f}%)",
                 f"lm loss {loss:.4f}"]
        if lr is not None:
            parts.append(f"lr {lr:.3e}")
        parts += [f"tokens/s {tokens_s:,.0f}", f"model TFLOP/s/GPU {tflops:.3g}"]
        if memory_bytes is not None:
            parts.append(f"mem {memory_bytes / 1e9:.2f} GB")
        parts.append(f"ETA {format_duration(eta)}")
        return " | ".join(parts)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return (f"{d}d" if d else "") + f"{h:02d}:{m:02d}:{s:02d}"
