"""Every CPU workaround for megatron-core lives here, and only here.

megatron-core assumes CUDA in a few places that a CPU run reaches (listed below).
`apply_cpu_patches()` replaces exactly those functions with
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
- megatron's training loop pieces (DistributedDataParallel's buffers and communication
  stream, the distributed optimizer, gradient clipping, timers): the same CPU-device `torch`
  for their modules, with a `torch.cuda` whose streams and events are no-ops (gloo ops are
  issued in order on the CPU), and `Tensor.type()` reporting `torch.cuda.*` names inside the
  two functions that accept only CUDA parameter types by name. Without TE or apex the
  distributed optimizer's checkpoint load needs two fixes: its states must exist before the
  load (its `state_dict()` reads their `step`), and each parameter gets its own loaded `step`
  tensor (megatron shares one, which torch's Adam then advances once per parameter).
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


class _CpuStream:
    """A CUDA stream stand-in: CPU work (and gloo) runs in program order, nothing to order."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, stream) -> None:
        return None

    def wait_event(self, event) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def record_event(self, event=None):
        return event if event is not None else _CpuEvent()


class _CpuEvent:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, stream=None) -> None:
        return None

    def wait(self, stream=None) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True


class _CpuCuda(types.ModuleType):
    """`torch.cuda` as seen by a patched module: no device to select or synchronize."""

    Stream = _CpuStream
    Event = _CpuEvent

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

    @staticmethod
    def current_stream(device=None) -> _CpuStream:
        return _CpuStream()

    @staticmethod
    def stream(stream=None):
        return contextlib.nullcontext()


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
    "megatron.core.timers",  # synchronize() around every timer
    "megatron.core.utils",  # status tensors (e.g. the NaN check) on CUDA
    "megatron.core.distributed.param_and_grad_buffer",  # DDP buffers on current_device(), streams
    "megatron.core.optimizer.optimizer",  # the found-inf flag on CUDA
    "megatron.core.optimizer.clip_grads",  # the norm and overflow buffers on CUDA
)
# The same, but only where already imported: `megatron.training` (0.19 ships it) pulls in
# optional dependencies a CPU runner never needs; Megatron-Bridge's model wrapping imports it.
_CPU_DEVICE_MODULES_IF_LOADED = (
    "megatron.training.models.dist_utils",  # DDP's communication stream
)


def _patch_module_devices() -> None:
    import importlib
    import sys

    modules = [importlib.import_module(name) for name in _CPU_DEVICE_MODULES]
    modules += [sys.modules[name] for name in _CPU_DEVICE_MODULES_IF_LOADED if name in sys.modules]
    for module in modules:
        if not getattr(module.torch, _MARK, False):
            module.torch = _CpuDeviceTorch()


_type_as_cuda = 0  # > 0 while a function in _CUDA_TYPE_NAME_FUNCTIONS runs


def _tensor_type(self, *args, **kwargs):
    name = _tensor_type.original(self, *args, **kwargs)
    if _type_as_cuda and not args and not kwargs and self.device.type == "cpu" and not name.startswith("torch.cuda."):
        return "torch.cuda." + name.removeprefix("torch.")
    return name


def _reporting_cuda_type_names(function):
    import functools

    @functools.wraps(function)
    def run(*args, **kwargs):
        global _type_as_cuda
        _type_as_cuda += 1
        try:
            return function(*args, **kwargs)
        finally:
            _type_as_cuda -= 1

    return run


def _patch_type_checks() -> None:
    """The distributed optimizer and fp32 clipping accept parameters by `Tensor.type()` name
    ('torch.cuda.BFloat16Tensor', ...); inside those two functions a CPU tensor reports it."""
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    if not getattr(torch.Tensor.type, _MARK, False):
        _tensor_type.original = torch.Tensor.type
        setattr(_tensor_type, _MARK, True)
        torch.Tensor.type = _tensor_type
    _patch(distrib_optimizer.DistributedOptimizer, "__init__",
           _reporting_cuda_type_names(distrib_optimizer.DistributedOptimizer.__init__))
    clip = _reporting_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    _patch(clip_grads, "clip_grad_by_total_norm_fp32", clip)
    if hasattr(optimizer, "clip_grad_by_total_norm_fp32"):  # imported by name there
        _patch(optimizer, "clip_grad_by_total_norm_fp32", clip)


def _patch_optimizer_state_before_load() -> None:
    """Without TE or apex, `DistributedOptimizer.state_dict()` reads the `step` of torch's
    Adam states, which a fresh optimizer does not have yet, so building the sharded state dict
    to load a checkpoint into fails (`assert len(steps) == 1`). Give it states first with
    megatron's own dummy step (what it does before Megatron-FSDP loads); the load replaces
    them, as it replaces the parameters."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    sharded_state_dict = DistributedOptimizer.sharded_state_dict

    def with_states(self, model_sharded_state_dict, is_loading: bool = False, *args, **kwargs):
        if is_loading and not self.optimizer.state:
            # the dummy step applies weight decay: keep the parameters exactly as they are
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            kept = [p.detach().clone() for p in params]
            self._init_optimizer_states_with_dummy_values()
            with torch.no_grad():
                for p, value in zip(params, kept):
                    p.copy_(value)
        return sharded_state_dict(self, model_sharded_state_dict, is_loading, *args, **kwargs)

    _patch(DistributedOptimizer, "sharded_state_dict", with_states)

    load_state_dict = DistributedOptimizer.load_state_dict

    def with_own_steps(self, state_dict):
        load_state_dict(self, state_dict)
        # ... and it hands every parameter's state the SAME `step` tensor, which torch's Adam
        # increments in place once per parameter: after a resume the bias correction ran ahead.
        steps = {g["step"] for g in state_dict["optimizer"]["param_groups"] if "step" in g}
        if len(steps) == 1:
            step = float(steps.pop())
            for param_state in self.optimizer.state.values():
                param_state["step"] = torch.tensor(step, dtype=torch.float32)

    _patch(DistributedOptimizer, "load_state_dict", with_own_steps)


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
    _patch_type_checks()
    _patch_optimizer_state_before_load()
    return True
