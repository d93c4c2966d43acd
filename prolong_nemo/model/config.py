"""The one place that describes a Llama-3 architecture.

`LlamaArch` is plain data (no torch, no megatron import) so converters, the planner and
recipes can read it anywhere; `to_transformer_config` turns it into a megatron-core
`TransformerConfig` for building the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# rope_theta per ProLong stage (ProLong's train_64K.sh / train_512K.sh); Llama-3 itself uses 500,000.
ROPE_THETA_LLAMA3 = 500_000.0
ROPE_THETA_64K = 8_000_000.0
ROPE_THETA_512K = 128_000_000.0


@dataclass(frozen=True)
class LlamaArch:
    """Architecture hyperparameters of a Llama-3-family decoder (defaults: Llama-3-8B)."""

    num_layers: int = 32
    hidden_size: int = 4096
    ffn_hidden_size: int = 14336
    num_attention_heads: int = 32
    num_query_groups: int = 8
    vocab_size: int = 128256
    norm_eps: float = 1e-5
    rope_theta: float = ROPE_THETA_LLAMA3
    # Llama-3.1 style scaling ({"rope_type": "llama3", "factor": ..., ...}) or None.
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False, compare=True)
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_query_groups {self.num_query_groups} (GQA)"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **changes: Any) -> "LlamaArch":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, LlamaArch] = {
    "llama3-8b": LlamaArch(),
    # Same architecture family, small enough for CPU tests and the demo. The full Llama-3
    # vocabulary is kept where the real tokenizer is used; "tiny" shrinks it for fast unit tests.
    "llama3-tiny": LlamaArch(
        num_layers=2, hidden_size=64, ffn_hidden_size=224, num_attention_heads=4,
        num_query_groups=2, vocab_size=512, max_position_embeddings=4096,
    ),
    # The CPU demo: the real Llama-3 tokenizer, so the full vocabulary; narrow, because the
    # [tokens x 128256] LM head dominates a CPU step.
    "llama3-demo": LlamaArch(
        num_layers=4, hidden_size=128, ffn_hidden_size=448, num_attention_heads=4,
        num_query_groups=2, vocab_size=128256, max_position_embeddings=8192,
    ),
}


def preset(name: str, **changes: Any) -> LlamaArch:
    try:
        arch = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None
    return arch.replace(**changes) if changes else arch
