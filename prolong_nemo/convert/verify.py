"""Load a HF folder and a Megatron checkpoint side by side (small models, CPU) and compare logits.

The Megatron side is a real megatron-core GPTModel (local layer spec) filled by
`dist_checkpointing.load(model.sharded_state_dict(), ...)`, i.e. exactly what a training run
requests from the checkpoint. The HF side runs with the checkpoint's rope settings, so a
checkpoint converted with a rope_theta override still compares weight for weight.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from prolong_nemo.convert import dcp_io, hf_config, megatron_io
from prolong_nemo.convert.mapping import ConversionError
from prolong_nemo.model.config import LlamaArch

_STRUCTURE = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "vocab_size", "tie_word_embeddings")


@dataclass(frozen=True)
class VerifyResult:
    max_abs_logit_diff: float
    tokens: int
    arch: LlamaArch
    notes: tuple[str, ...]


def ensure_single_process_group() -> None:
    """A gloo world of one plus megatron's model-parallel groups (TP = PP = CP = 1)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from prolong_nemo.cpu_compat import apply_cpu_patches

    apply_cpu_patches()
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)


def load_megatron_model(ckpt: Path, arch: LlamaArch | None = None, seq_length: int = 128):
    """An fp32 megatron-core GPTModel on CPU with the checkpoint's weights (strict)."""
    from megatron.core import dist_checkpointing

    from prolong_nemo.model.builder import build_gpt_model

    iter_dir = megatron_io.resolve_iter_dir(Path(ckpt))
    arch = arch or megatron_io.read_recorded_config(iter_dir)[0]
    dcp_io.load_metadata(iter_dir)  # allow-listed unpickling first: refuses a hostile .metadata
    ensure_single_process_group()
    model = build_gpt_model(arch, seq_length, backend="local")
    # Nested under "model" like Megatron / Bridge training; common-state keys sit beside it.
    state = dist_checkpointing.load({"model": _weights_only(model.sharded_state_dict())}, str(iter_dir))
    model.load_state_dict(state["model"], strict=True)
    return model.eval(), arch


def _weights_only(sharded: dict) -> dict:
    """Keep the model's own `_extra_state` objects: DCP would unpickle the stored ones with
    weights_only=False, and they carry no weights (FP8 metadata, empty here)."""
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedObject

    return {k: LocalNonpersistentObject(v.data) if isinstance(v, ShardedObject) else v for k, v in sharded.items()}


def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(tokens.size(1)).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(input_ids=tokens, position_ids=positions, attention_mask=None).float()


def load_hf_model(hf_dir: Path, arch: LlamaArch | None = None):
    """HF LlamaForCausalLM in fp32; with `arch`, its rope settings replace the folder's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_dir = Path(hf_dir)
    own, extras = hf_config.arch_from_hf_config(hf_config.read_config(hf_dir), str(hf_dir / "config.json"))
    arch = arch or own
    config = LlamaConfig(**hf_config.hf_config_dict(arch, extras))
    model = LlamaForCausalLM.from_pretrained(hf_dir, config=config, dtype=torch.float32)
    return model.eval(), own


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def default_prompt(vocab_size: int, length: int = 24, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, length), generator=gen)


def verify(hf_dir: Path, ckpt: Path, tokens: torch.Tensor | None = None) -> VerifyResult:
    """max |logit diff| between the HF folder and the Megatron checkpoint on one prompt."""
    mcore_model, arch = load_megatron_model(ckpt)
    # Compare the configs before loading: HF weights of another shape fail with a torch error.
    hf_arch = hf_config.arch_from_hf_config(hf_config.read_config(hf_dir), str(Path(hf_dir) / "config.json"))[0]
    differs = [f for f in _STRUCTURE if getattr(hf_arch, f) != getattr(arch, f)]
    if differs:
        raise ConversionError(f"{hf_dir} and {ckpt} are different architectures ({', '.join(differs)})")
    hf_model, _ = load_hf_model(hf_dir, arch)
    notes = []
    if (hf_arch.rope_theta, hf_arch.rope_scaling) != (arch.rope_theta, arch.rope_scaling):
        notes.append(
            f"rope differs (HF {hf_arch.rope_theta:g} {hf_arch.rope_scaling}, Megatron {arch.rope_theta:g} "
            f"{arch.rope_scaling}); the HF side ran with the checkpoint's"
        )
    tokens = default_prompt(arch.vocab_size) if tokens is None else tokens
    diff = (megatron_logits(mcore_model, tokens) - hf_logits(hf_model, tokens)).abs().max().item()
    return VerifyResult(diff, tokens.numel(), arch, tuple(notes))
