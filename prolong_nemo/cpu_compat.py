"""Every CPU workaround for megatron-core lives here, and only here.

megatron-core assumes CUDA in a few places that a CPU run reaches (megatron-contracts.md,
"Megatron-Core on a CPU"). `apply_cpu_patches()` replaces exactly those functions with
CPU-capable equivalents; it is idempotent and does nothing when CUDA is available, so GPU
runs always execute megatron-core's own code.

Patched (megatron-core 0.17-0.19):
- `RotaryEmbedding.get_emb` moves `inv_freq` to `torch.cuda.current_device()`.
- `GlobalMemoryBuffer.get_tensor` allocates on CUDA.
- the RNG tracker (`CudaRNGStatesTracker.add/fork`) and the activation-checkpoint RNG
  save/restore (`_get_cuda_rng_state` / `_set_cuda_rng_state`) use CUDA generators; on CPU
  the tracker keeps named CPU generator states instead, so forked regions stay reproducible.
- four modules create tensors explicitly on CUDA or call `torch.cuda.synchronize()`
  (`pipeline_parallel.schedules`: the per-token-loss token counter; the dist-checkpoint
  saver and async filesystem writer: status flags, synchronize; `tensor_parallel.mappings`:
  sequence-parallel gather/scatter outputs): those modules, and only those, see a `torch`
  whose explicit CUDA allocations land on the CPU (`_CPU_DEVICE_MODULES`).
"""

from __future__ import annotations

import contextlib
import operator
import types
from functools import reduce

import torch

_MARK = "_prolong_cpu_patched"


def _patch(owner, name: str, replacement) -> None:
    if getattr(getattr(owner, name), _MARK, False):
        return
    setattr(replacement, _MARK, True)
    setattr(owner, name, replacement)


def _patch_rotary() -> None:
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        # Same math as upstream, on inv_freq's own device.
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        if self.rotary_interleaved:
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb[:, None, None, :]

    _patch(RotaryEmbedding, "get_emb", get_emb)


def _patch_memory_buffer() -> None:
    from megatron.core.utils import GlobalMemoryBuffer

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        required = reduce(operator.mul, tensor_shape, 1)
        buf = self.buffer.get((name, dtype))
        if buf is None or buf.numel() < required:
            buf = self.buffer[(name, dtype)] = torch.empty(required, dtype=dtype, device="cpu")
        return buf[:required].view(*tensor_shape)

    _patch(GlobalMemoryBuffer, "get_tensor", get_tensor)


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)

    def get_state(device="cuda", clone=False, graph_safe=False):
        return None  # the CPU generator is saved separately by megatron's callers

    def set_state(new_state, device=-1, graph_safe=False):
        if new_state is not None:
            raise RuntimeError("a CUDA RNG state cannot be restored on a CPU-only machine")

    _patch(mrandom.CudaRNGStatesTracker, "add", add)
    _patch(mrandom.CudaRNGStatesTracker, "fork", fork)
    _patch(mrandom, "_get_cuda_rng_state", get_state)
    _patch(mrandom, "_set_cuda_rng_state", set_state)


def _cpu_device(device):
    """Explicit CUDA devices (names or indices) become the CPU; anything else is kept."""
    if device is None or (isinstance(device, str) and device == "cpu"):
        return device
    if isinstance(device, int) or torch.device(device).type == "cuda":
        return "cpu"
    return device


class _CpuCuda(types.ModuleType):
    """`torch.cuda` as seen by a patched module: no device to select or synchronize."""

    def __init__(self) -> None:
        super().__init__("torch.cuda")

    def __getattr__(self, name: str):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def synchronize(device=None) -> None:
        return None


def _on_cpu(factory):
    def create(*args, device=None, **kwargs):
        return factory(*args, device=_cpu_device(device), **kwargs)

    return staticmethod(create)


class _CpuDeviceTorch(types.ModuleType):
    """`torch` for selected megatron modules: identical except that tensors those modules
    explicitly create on CUDA (counters, flags, status broadcasts) are created on the CPU."""

    zeros = _on_cpu(torch.zeros)
    ones = _on_cpu(torch.ones)
    empty = _on_cpu(torch.empty)
    tensor = _on_cpu(torch.tensor)

    def __init__(self) -> None:
        super().__init__("torch")
        setattr(self, _MARK, True)
        self.cuda = _CpuCuda()

    def __getattr__(self, name: str):
        return getattr(torch, name)


# Modules whose CUDA use is only explicit placement of tensors they create, or synchronize().
_CPU_DEVICE_MODULES = (
    "megatron.core.pipeline_parallel.schedules",  # token counter: zeros(device="cuda")
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",  # status flags on CUDA
    "megatron.core.dist_checkpointing.strategies.filesystem_async",  # cuda.synchronize()
    "megatron.core.tensor_parallel.mappings",  # sequence-parallel gather/scatter buffers
)


def _patch_module_devices() -> None:
    import importlib

    for name in _CPU_DEVICE_MODULES:
        module = importlib.import_module(name)
        if not getattr(module.torch, _MARK, False):
            module.torch = _CpuDeviceTorch()


def apply_cpu_patches(force: bool = False) -> bool:
    """Patch megatron-core for CPU execution. Returns True when patches are in place.

    No-op on a CUDA machine unless `force` (tests use force to exercise the patches).
    """
    if torch.cuda.is_available() and not force:
        return False
    _patch_rotary()
    _patch_memory_buffer()
    _patch_rng()
    _patch_module_devices()
    return True
