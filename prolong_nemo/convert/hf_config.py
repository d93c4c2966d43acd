"""Hugging Face Llama `config.json` <-> `LlamaArch`, for transformers 4 and 5 shapes.

transformers 4 writes `rope_theta` / `rope_scaling` at the top level, transformers 5 writes
`rope_parameters`; both are read, and both are written (consistently) so either version
loads the exported folder. Anything megatron-core's GPTModel cannot reproduce is refused.

`generation_config.json`: the source model's, when the conversion recorded one (HfExtras, kept in
the checkpoint's `prolong.hf` record), is written back as it was; otherwise only the bos/eos ids
(what transformers derives from config.json: greedy decoding), never invented sampling settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from prolong_nemo.convert.mapping import ConversionError
from prolong_nemo.model.config import LlamaArch

# megatron-core's RotaryEmbedding applies Llama-3.1 scaling with these fixed values.
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
LLAMA3_BOS, LLAMA3_EOS = 128000, 128001
TRANSFORMERS_VERSION = "4.57.6"
GENERATION_CONFIG_FILE = "generation_config.json"
# `convert megatron-to-hf --dtype`: config.json's "dtype" name -> the tensors' dtype; "auto" keeps the stored one.
EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def export_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """The dtype an export casts to; None for "auto" (the checkpoint's stored dtype)."""
    if name is None or name == "auto":
        return None
    if isinstance(name, torch.dtype) and name in EXPORT_DTYPES.values():
        return name
    if isinstance(name, str) and name in EXPORT_DTYPES:
        return EXPORT_DTYPES[name]
    raise ConversionError(f"dtype {name!r}: not one of auto, {', '.join(EXPORT_DTYPES)}")


@dataclass(frozen=True)
class HfExtras:
    """Config fields with no place in LlamaArch that an export should carry over, and the source
    model's generation_config.json (None: it had none, or the record predates carrying it)."""

    bos_token_id: int | list[int] | None = LLAMA3_BOS
    eos_token_id: int | list[int] | None = LLAMA3_EOS
    torch_dtype: str = "bfloat16"
    generation_config: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "torch_dtype": self.torch_dtype}
        if self.generation_config is not None:
            d["generation_config"] = dict(self.generation_config)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "HfExtras":
        d = d or {}
        generation = d.get("generation_config")
        return cls(
            bos_token_id=d.get("bos_token_id", LLAMA3_BOS),
            eos_token_id=d.get("eos_token_id", LLAMA3_EOS),
            torch_dtype=d.get("torch_dtype", "bfloat16"),
            generation_config=dict(generation) if isinstance(generation, dict) else None,
        )


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path}: no config.json (not a Hugging Face model folder)")
    with open(path) as f:
        return json.load(f)


def read_generation_config(folder: Path) -> dict[str, Any] | None:
    """A HF folder's generation_config.json as a dict, None when it has none."""
    path = Path(folder) / GENERATION_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: not a JSON object")
    return data


def read_hf_model(folder: Path) -> tuple[LlamaArch, HfExtras]:
    """Architecture and extras of a HF Llama folder: config.json and generation_config.json."""
    folder = Path(folder)
    arch, extras = arch_from_hf_config(read_config(folder), str(folder / "config.json"))
    return arch, replace(extras, generation_config=read_generation_config(folder))


def _rope_fields(cfg: dict[str, Any], where: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either config shape."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:  # transformers 5
        theta = params["rope_theta"]
        scaling = params if params.get("rope_type", "default") != "default" else None
    else:
        theta = cfg.get("rope_theta", 10000.0)
        scaling = cfg.get("rope_scaling")
    return float(theta), normalize_rope_scaling(scaling, where)


def normalize_rope_scaling(scaling: dict[str, Any] | None, where: str) -> dict[str, Any] | None:
    """None or Llama-3.1 scaling in canonical form; refuse anything megatron-core cannot apply."""
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ConversionError(
            f"{where}: rope_scaling type {kind!r} is not supported (only Llama-3.1 'llama3' scaling "
            "maps onto megatron-core's RotaryEmbedding)"
        )
    if "factor" not in scaling:
        raise ConversionError(f"{where}: llama3 rope_scaling without 'factor'")
    out = {"rope_type": "llama3", "factor": float(scaling["factor"])}
    for key, fixed in LLAMA3_FIXED.items():
        value = float(scaling.get(key, fixed))
        if value != fixed:
            raise ConversionError(
                f"{where}: llama3 rope_scaling {key}={value} is not representable "
                f"(megatron-core's RotaryEmbedding fixes it to {fixed})"
            )
        out[key] = int(fixed) if key == "original_max_position_embeddings" else fixed
    return out


def _refuse_unsupported(cfg: dict[str, Any], where: str) -> None:
    model_type = cfg.get("model_type")
    if model_type != "llama":
        raise ConversionError(f"{where}: model_type {model_type!r} is not a Llama model")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (Llama uses silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ConversionError(f"{where}: {flag}=true is not supported (Llama-3 has no biases)")
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    groups = cfg.get("num_key_value_heads") or heads
    if hidden % heads:
        raise ConversionError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    if heads % groups:
        raise ConversionError(
            f"{where}: num_attention_heads {heads} is not divisible by num_key_value_heads {groups} "
            "(GQA groups must divide the heads)"
        )
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim != hidden // heads:
        raise ConversionError(f"{where}: head_dim {head_dim} != hidden_size / num_attention_heads ({hidden // heads})")


def arch_from_hf_config(cfg: dict[str, Any], where: str = "config.json") -> tuple[LlamaArch, HfExtras]:
    _refuse_unsupported(cfg, where)
    theta, scaling = _rope_fields(cfg, where)
    heads = cfg["num_attention_heads"]
    arch = LlamaArch(
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        vocab_size=cfg["vocab_size"],
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"
    extras = HfExtras(cfg.get("bos_token_id"), cfg.get("eos_token_id"), str(dtype).replace("torch.", ""))
    return arch, extras


def hf_config_dict(arch: LlamaArch, extras: HfExtras) -> dict[str, Any]:
    """A config.json both transformers 4 and 5 read as this exact architecture."""
    rope_parameters = {"rope_type": "default", "rope_theta": arch.rope_theta}
    if arch.rope_scaling:
        rope_parameters = {**arch.rope_scaling, "rope_theta": arch.rope_theta}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": extras.bos_token_id,
        "eos_token_id": extras.eos_token_id,
        "head_dim": arch.head_dim,
        "hidden_act": "silu",
        "hidden_size": arch.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": arch.ffn_hidden_size,
        "max_position_embeddings": arch.max_position_embeddings,
        "mlp_bias": False,
        "num_attention_heads": arch.num_attention_heads,
        "num_hidden_layers": arch.num_layers,
        "num_key_value_heads": arch.num_query_groups,
        "pretraining_tp": 1,
        "rms_norm_eps": arch.norm_eps,
        "rope_scaling": dict(arch.rope_scaling) if arch.rope_scaling else None,
        "rope_theta": arch.rope_theta,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "dtype": extras.torch_dtype,  # transformers >= 4.56 and 5 read "dtype" ("torch_dtype" warns)
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": arch.vocab_size,
    }


def generation_config_dict(extras: HfExtras) -> dict[str, Any]:
    """The recorded source generation_config.json as it was, else the bos/eos ids only."""
    if extras.generation_config is not None:
        return dict(extras.generation_config)
    return {"bos_token_id": extras.bos_token_id, "eos_token_id": extras.eos_token_id}
