"""The progress log both backends print: progress, ETA, tokens/s, model TFLOP/s per GPU,
memory, lm loss."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from prolong_nemo.model.config import LlamaArch
from prolong_nemo.model.flops import flops_per_token
from prolong_nemo.recipes.config import RecipeConfig


def model_flops_per_token(arch: LlamaArch, seq_length: int) -> float:
    """Training FLOPs per token (3 x forward, no recompute; `model.flops`) of a row holding one
    `seq_length`-token document: the nominal (upper) count, as the log does not see a step's
    document lengths (document masking skips the cross-document attention blocks)."""
    return flops_per_token(arch, float(seq_length), float(seq_length) ** 2)


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
             lr: float | None = None, now: float | None = None, tokens: int | None = None) -> str:
        """One log line after optimizer step `step` (1-based) that took `step_seconds`;
        `tokens`: the step's own token count where rows vary (default: `tokens_per_step`)."""
        now = time.perf_counter() if now is None else now
        if self.first_step is None:  # the ETA uses the steps done by this process
            self.first_step, self.started = step - 1, now - step_seconds
        done = max(step - self.first_step, 1)
        eta = (now - self.started) / done * max(self.total_steps - step, 0)
        scale = 1.0 if tokens is None or not self.tokens_per_step else tokens / self.tokens_per_step
        tokens_s = self.tokens_per_step * scale / step_seconds if step_seconds > 0 else float("nan")
        tflops = (self.flops_per_step * scale / step_seconds / self.world_size / 1e12 if step_seconds > 0
                  else float("nan"))
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
