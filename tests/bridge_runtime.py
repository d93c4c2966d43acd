"""Megatron-Bridge's real `pretrain()` loop on CPU (gloo), for tests/test_bridge_pretrain.py.

One rank of a torchrun job: `python -m torch.distributed.run --nproc-per-node 2
tests/bridge_runtime.py SPEC.json`. SPEC lists the runs, each a recipe with Hydra overrides,
trained one after another in this process through `prolong_nemo.training.bridge`'s own
`build_config_container`, `callbacks_for` and forward step, i.e. Bridge's setup, data loader,
megatron-core's DistributedDataParallel, distributed optimizer, schedules, checkpointing.

Nothing here is production code. What it changes, and why (every shim of the Bridge tests):

Imports (Bridge is installed without dependencies, beside the venv; scripts/setup.sh):
- `megatron.bridge` and `megatron.bridge.data` package `__init__`s are skipped: they import
  every model bridge / dataset builder; the training modules import what they use directly.
- `megatron.bridge.peft.lora_layers` (and in 0.5.0 `megatron.bridge.peft.lora`) run from
  their real source minus their one import of Transformer Engine (which a CPU cannot load),
  `te` being placeholder classes (0.5.0 subclasses `te.Linear` at import); no TE class is
  ever instantiated here.
- `nvidia_resiliency_ext`: a stub offering `inprocess.CallWrapper` (a type annotation in
  `pretrain.py`); PyPI's release is older than megatron-core 0.19 accepts. Every other use is
  behind a try/except and stays off (no fault tolerance, no in-process restart).
- `megatron.bridge.data.builders.energon`: placeholder names; imported for multimodal
  datasets, its dependency tree (megatron-energon, multi-storage-client, s3fs) is unused.
- the rest of Bridge's imports are real packages in `.venv/extras/bridge-runtime`
  (datasets, modelopt, tensorboard, ...) and transformers 5 (`.venv/extras/transformers5`).

CUDA (Bridge's loop calls torch.cuda directly; megatron-core's are in prolong_nemo/cpu_compat):
- Bridge's modules see a `torch` whose `torch.cuda` reports one CPU "device" (no-op
  set_device / synchronize / streams, zero memory statistics, a placeholder CUDA RNG state)
  and whose explicit CUDA allocations land on the CPU.
- `compile_helpers()` is skipped: the megatron-core wheel ships `helpers_cpp` prebuilt and no
  Makefile to rebuild it with.
- `set_jit_fusion_options()` is skipped: it warms up CUDA JIT fusion kernels.
- `get_model(use_cpu_initialization=True)`: `pretrain` passes False, which moves the model to
  CUDA after building it.

Preemption inside one launch (a spec run with "sigterm_at": N): a callback sends the rank
SIGTERM after step N; Bridge saves and calls `sys.exit`, which ends that run only, after
Bridge's own `destroy_global_state()` (which the exit skips), so the next run can resume.

Run settings a CPU needs (everything else is the recipe's production mapping): gloo, the
local layer spec with our THD attention, fused kernels off, a DDP bucket small enough that the
output layer sits in a bucket of its own (as at 8B width, where it is 525M elements).
"""

from __future__ import annotations
import __future__

import importlib.abc
import importlib.util
import json
import os
import signal
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXTRAS = REPO / ".venv" / "extras"
# release -> (side folder of megatron-bridge, side folder of the megatron-core it runs on or None)
RELEASES = {"0.6.2": ("bridge", None), "0.5.0": ("bridge05", "mcore018")}
BUCKET_SIZE = 10_000  # elements; the tiny preset's output layer has 32,768


# ---- imports -------------------------------------------------------------------------------


class _Placeholders(types.ModuleType):
    """A module whose every public name is a fresh, unused class."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (), {"__module__": self.__name__})
        setattr(self, name, value)
        return value


class _SourceWithout(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Load one module from its real source with one import line removed; `namespace` gives
    the module names before its code runs (what the removed import would have bound)."""

    def __init__(self, name: str, path: Path, line: str, namespace: dict) -> None:
        self.name, self.path, self.namespace = name, path, namespace
        source = path.read_text()
        assert line in source, f"{path} no longer has {line!r}"
        self.source = source.replace(line, "")

    def find_spec(self, fullname, path, target=None):
        if fullname == self.name:
            return importlib.util.spec_from_loader(fullname, self, origin=str(self.path))
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        module.__dict__.update(self.namespace)
        # annotations stay strings: the removed module's classes appear in them
        code = compile(self.source, str(self.path), "exec", flags=__future__.annotations.compiler_flag,
                       dont_inherit=True)
        exec(code, module.__dict__)


def install_import_shims(release: str) -> Path:
    bridge_folder, core_folder = RELEASES[release]
    site = EXTRAS / bridge_folder
    paths = [site, EXTRAS / "transformers5", EXTRAS / "bridge-runtime"]
    if core_folder:
        paths.insert(0, EXTRAS / core_folder)
    sys.path[:0] = [str(p) for p in paths]
    for name, sub in (("megatron.bridge", ""), ("megatron.bridge.data", "data")):
        package = types.ModuleType(name)
        package.__path__ = [str(site / "megatron" / "bridge" / sub)]
        sys.modules[name] = package
    te_import = "import transformer_engine.pytorch as te\n"
    for name in ("megatron.bridge.peft.lora_layers", "megatron.bridge.peft.lora"):
        path = site / (name.replace(".", "/") + ".py")
        if te_import in path.read_text():  # lora.py imports TE in 0.5.0 only
            te = _Placeholders("transformer_engine.pytorch")
            sys.meta_path.insert(0, _SourceWithout(name, path, te_import, namespace={"te": te}))
    energon = _Placeholders("megatron.bridge.data.builders.energon")
    energon.__path__ = []
    sys.modules[energon.__name__] = energon
    nvrx = types.ModuleType("nvidia_resiliency_ext")
    nvrx.__path__, nvrx.__version__ = [], "0.0.0"
    nvrx.inprocess = types.ModuleType("nvidia_resiliency_ext.inprocess")
    nvrx.inprocess.CallWrapper = type("CallWrapper", (), {})
    sys.modules.update({"nvidia_resiliency_ext": nvrx, "nvidia_resiliency_ext.inprocess": nvrx.inprocess})
    return site


# ---- CUDA ----------------------------------------------------------------------------------


def _bridge_torch():
    import torch

    from prolong_nemo import cpu_compat

    class BridgeCuda(cpu_compat._CpuCuda):
        @staticmethod
        def is_available() -> bool:  # Bridge asserts it; its CUDA calls all land here
            return True

        set_device = staticmethod(lambda *a, **k: None)
        device_count = staticmethod(lambda: 1)
        empty_cache = staticmethod(lambda: None)
        reset_peak_memory_stats = staticmethod(lambda *a, **k: None)
        memory_stats = staticmethod(lambda *a, **k: {})
        max_memory_allocated = memory_allocated = staticmethod(lambda *a, **k: 0)
        max_memory_reserved = memory_reserved = staticmethod(lambda *a, **k: 0)
        get_rng_state = staticmethod(lambda *a, **k: torch.zeros(8, dtype=torch.uint8))
        set_rng_state = staticmethod(lambda *a, **k: None)

    class BridgeTorch(cpu_compat._CpuDeviceTorch):
        full = cpu_compat._on_cpu(torch.full)
        arange = cpu_compat._on_cpu(torch.arange)
        rand = cpu_compat._on_cpu(torch.rand)
        randn = cpu_compat._on_cpu(torch.randn)

        def __init__(self) -> None:
            super().__init__()
            self.cuda = BridgeCuda()

    return BridgeTorch()


def install_cuda_shims() -> None:
    import megatron.bridge.training.pretrain  # noqa: F401 - loads the loop's modules
    import torch
    from megatron.bridge.models import model_provider
    from megatron.bridge.training import initialize, setup

    from prolong_nemo.cpu_compat import apply_cpu_patches

    apply_cpu_patches(force=True)
    fake = _bridge_torch()
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.bridge.") and getattr(module, "torch", None) is torch:
            module.torch = fake
    initialize.compile_helpers = lambda: None
    setup.set_jit_fusion_options = lambda *a, **k: None
    get_model = model_provider.get_model

    def get_model_on_cpu(*args, **kwargs):
        kwargs["use_cpu_initialization"] = True
        return get_model(*args, **kwargs)

    model_provider.get_model = get_model_on_cpu


# ---- runs ----------------------------------------------------------------------------------


def cpu_settings(cfg) -> None:
    from prolong_nemo.model.builder import layer_spec

    cfg.dist.distributed_backend = "gloo"
    cfg.model.transformer_layer_spec = layer_spec("local")
    for name in ("cross_entropy_loss_fusion", "bias_activation_fusion", "bias_dropout_fusion", "apply_rope_fusion",
                 "gradient_accumulation_fusion"):
        setattr(cfg.model, name, False)
    cfg.ddp.bucket_size = BUCKET_SIZE


def _recorder(path: str):
    """A Bridge callback writing each step's loss (full precision) and the LR, last rank only."""
    import torch
    from megatron.bridge.training.callbacks import Callback

    class LossRecorder(Callback):
        def on_train_step_end(self, context) -> None:
            if torch.distributed.get_rank() != torch.distributed.get_world_size() - 1:
                return
            loss = (context.loss_dict or {}).get("lm loss")
            record = {"step": context.state.train_state.step + 1, "loss": float(loss),
                      "lr": float(context.optimizer.param_groups[0]["lr"])}
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")

    return LossRecorder()


def _sigterm_at(step: int):
    """A Bridge callback sending this rank SIGTERM after `step`, as torchrun forwards a Slurm
    SIGTERM to every rank: the rank's trap (Bridge's, or SignalTrapCallback's) must catch it."""
    from megatron.bridge.training.callbacks import Callback

    class Preempt(Callback):
        def on_train_step_end(self, context) -> None:
            if context.state.train_state.step + 1 == step:
                os.kill(os.getpid(), signal.SIGTERM)

    return Preempt()


def run(recipe_name: str, overrides: list[str], metrics: str, sigterm_at: int | None = None) -> None:
    """One `pretrain()`; with `sigterm_at`, the run must save and exit on that SIGTERM."""
    from megatron.bridge.training.initialize import destroy_global_state
    from megatron.bridge.training.pretrain import pretrain

    from prolong_nemo.recipes.stages import load_recipe
    from prolong_nemo.training.bridge.config import build_config_container
    from prolong_nemo.training.bridge.main import callbacks_for
    from prolong_nemo.training.forward_step import StepOptions, make_forward_step
    from prolong_nemo.training.start import resolve_start

    recipe = load_recipe(recipe_name, overrides)
    start = resolve_start(recipe)
    cfg = build_config_container(recipe, start)
    cpu_settings(cfg)
    step = make_forward_step(StepOptions(recipe.loss.impl, recipe.loss.chunk_tokens, partition_for_cp=True))
    callbacks = [*callbacks_for(recipe, start), _recorder(metrics)]
    if sigterm_at is None:
        pretrain(cfg, step, callbacks=callbacks)
        return
    try:
        pretrain(cfg, step, callbacks=[*callbacks, _sigterm_at(sigterm_at)])
    except SystemExit as stop:  # Bridge's exit after the SIGTERM save: the job would end here
        print(f"pretrain exited ({stop.code}) after SIGTERM at step {sigterm_at}", flush=True)
        destroy_global_state()  # what a normal end does (the exit skips it); the next run starts clean
    else:
        raise AssertionError(f"SIGTERM at step {sigterm_at} did not stop the run")


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    install_import_shims(spec.get("bridge", "0.6.2"))
    install_cuda_shims()
    import torch

    # Created here, not by Bridge, so that Bridge neither creates nor destroys it and several
    # runs (a stage chain) share one process.
    torch.distributed.init_process_group("gloo")
    for item in spec["runs"]:
        run(item["recipe"], item["overrides"], item["metrics"], item.get("sigterm_at"))
    if os.environ.get("RANK", "0") == "0":
        Path(spec_path).with_suffix(".done").write_text("ok\n")


if __name__ == "__main__":
    main(sys.argv[1])
