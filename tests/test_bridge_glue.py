"""The Megatron-Bridge glue against the real megatron-bridge packages (both pinned below).

Two releases are tested, each from its own side folder: 0.5.0 (NGC NeMo 26.06, the default
container, with megatron-core 0.18) and 0.6.2 (the newest). Tests that read Bridge take the
module-level `bridge` fixture, parametrized over both; version-specific expectations live in
`RELEASES`.

Bridge cannot be imported as a whole on a CPU machine: `megatron/bridge/__init__.py` imports
every model bridge, whose PEFT layers import Transformer Engine unconditionally, and
`training.config` / `training.pretrain` reach the same chain (plus nvidia-resiliency-ext,
whose PyPI release is older than megatron-core 0.19 accepts). So:
- modules that import without TE (`training.callbacks`, `data.base`, `training.utils.sig_utils`,
  `training.utils.packed_seq_utils`) are imported for real, skipping only the package
  `__init__`s (empty package objects with the real `__path__`), and
  `prolong_nemo.training.bridge`'s dataset provider is built on the real `DatasetProvider`;
  in 0.5 that class lives in `training.config`, whose dataset-contract classes are executed
  from the real source on their own (the rest of that module needs TE);
- functions of `training.gpt_step` (which imports TE-backed modules) are executed from the
  real source on their own, on our real collated batch;
- the config classes Bridge builds on (megatron.training.config, megatron.core) are
  instantiated for real with our keyword arguments;
- Bridge-only fields and signatures are read from the installed Bridge source (AST).

Bridge is installed without dependencies into side folders (never into the venv, where its
presence would make other tests try to import it), as scripts/setup.sh does:
    pip install --no-deps --target .venv/extras/bridge megatron-bridge==0.6.2
    pip install --no-deps --target .venv/extras/bridge05 megatron-bridge==0.5.0
PROLONG_BRIDGE_SITE, if set, replaces the folder of the release it holds.
"""

from __future__ import annotations
import __future__

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import os
import re
import signal
import sys
import types
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from prolong_nemo.model.config import preset
from prolong_nemo.recipes.config import RecipeError
from prolong_nemo.recipes.stages import load_recipe
from prolong_nemo.training.bridge.sections import TRAIN_STATE_COUNTERS, bridge_sections, model_overrides
from prolong_nemo.training.data import build_prolong_datasets, dataset_fields
from prolong_nemo.training.progress import ProgressMeter, format_duration, model_flops_per_token
from prolong_nemo.training.schedule import restart_schedule, schedule_of
from prolong_nemo.training.start import StartPoint, resolve_start

REPO = Path(__file__).resolve().parents[1]
EXTRAS = REPO / ".venv" / "extras"

# The Megatron-Bridge releases these tests pin, and what differs between them for our glue.
RELEASES = {
    "0.6.2": dict(
        folder="bridge",
        # where DataloaderConfig / DatasetBuildContext / DatasetProvider are defined
        contracts=("data/base.py", "megatron.bridge.data.base"),
        # GlobalState enters DistributedSignalHandler (exit_signal_handler works by itself)
        installs_signal_trap=True,
        # packed-sequence keys gpt_step.get_batch reads (current names first, legacy fallback)
        packed_keys=("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded",
                     "max_seqlen_q", "max_seqlen_kv"),
    ),
    "0.5.0": dict(
        folder="bridge05",
        contracts=("training/config.py", "megatron.bridge.training.config"),
        installs_signal_trap=False,
        packed_keys=("cu_seqlens", "cu_seqlens_argmin", "max_seqlen"),
    ),
}


def _site_of(version: str) -> Path:
    override = os.environ.get("PROLONG_BRIDGE_SITE")
    if override:
        found = [metadata.PathDistribution(d).version for d in Path(override).glob("megatron_bridge-*.dist-info")]
        if found == [version]:
            return Path(override)
    return EXTRAS / RELEASES[version]["folder"]


class Bridge(SimpleNamespace):
    """One pinned release: `version`, `site` (its side folder), the RELEASES facts."""

    def source(self, relative: str) -> Path:
        path = self.site / "megatron" / "bridge" / relative
        if not path.is_file():
            pytest.skip(f"megatron-bridge {self.version} not installed in {self.site} "
                        f"(pip install --no-deps --target {self.site} megatron-bridge=={self.version})")
        return path


@pytest.fixture(scope="module", params=list(RELEASES), ids=lambda v: f"bridge{v}")
def bridge(request):
    version = request.param
    release = Bridge(version=version, site=_site_of(version), **RELEASES[version])
    release.source("training/callbacks.py")  # skips when this release is not installed
    dist = metadata.PathDistribution(next(release.site.glob("megatron_bridge-*.dist-info")))
    assert dist.version == version, f"tests pin megatron-bridge {version} in {release.site}, found {dist.version}"
    return release


def dataclass_fields(path: Path, class_name: str) -> dict[str, bool]:
    """{field: has_default} of a dataclass defined in `path` (its own fields, not inherited)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return {stmt.target.id: stmt.value is not None for stmt in node.body
                    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)}
    raise AssertionError(f"{class_name} not found in {path}")


def function_params(path: Path, name: str) -> list[str]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return [a.arg for a in node.args.args + node.args.kwonlyargs]
    raise AssertionError(f"{name} not found in {path}")


def base_fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def exec_from_source(path: Path, module_name: str, names: set[str], namespace: dict,
                     imports_from: tuple[str, ...] = (), lazy_annotations: bool = False) -> types.ModuleType:
    """A module holding the top-level definitions `names` of `path`, executed from the real source.

    For Bridge modules that cannot be imported whole on a CPU: only the named classes,
    functions and assignments run (plus `path`'s own imports from the `imports_from` modules),
    compiled with `path` as file name. The module is in sys.modules while it executes (as in an
    import; dataclasses look it up) and is removed after unless the caller registers it.
    `lazy_annotations`: annotations stay strings, for functions annotated with names not loaded.
    """
    tree = ast.parse(path.read_text())

    def defined(node):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            return {node.name}
        if isinstance(node, ast.Assign):
            return {t.id for t in node.targets if isinstance(t, ast.Name)}
        return set()

    imports = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module in imports_from]
    nodes = [n for n in tree.body if defined(n) & names]
    missing = names - set().union(*map(defined, nodes))
    assert not missing, f"{sorted(missing)} not defined in {path}"
    module = types.ModuleType(module_name)
    module.__file__ = str(path)
    module.__dict__.update(namespace)
    code = compile(ast.Module(body=imports + nodes, type_ignores=[]), str(path), "exec",
                   flags=__future__.annotations.compiler_flag if lazy_annotations else 0, dont_inherit=True)
    sys.modules[module_name] = module
    try:
        exec(code, module.__dict__)
    finally:
        del sys.modules[module_name]
    return module


def _ours(name: str) -> bool:
    return name == "megatron.bridge" or name.startswith(("megatron.bridge.", "prolong_nemo.training.bridge."))


@pytest.fixture(scope="module")
def bridge_callbacks(bridge):
    """The real `megatron.bridge.training.callbacks`, imported without the package __init__."""
    saved_path = list(sys.path)
    sys.path.insert(0, str(bridge.site))
    package = types.ModuleType("megatron.bridge")
    package.__path__ = [str(bridge.site / "megatron" / "bridge")]
    sys.modules["megatron.bridge"] = package
    try:
        yield importlib.import_module("megatron.bridge.training.callbacks")
    finally:
        for name in [m for m in sys.modules if m == "megatron.bridge" or m.startswith("megatron.bridge.")]:
            del sys.modules[name]
        for name in [m for m in sys.modules if m.startswith("prolong_nemo.training.bridge.")]:
            del sys.modules[name]
        sys.path[:] = saved_path


@pytest.fixture
def bridge_data(bridge):
    """The real module of Bridge's dataset contracts, and our `prolong_nemo.training.bridge` on top of it.

    0.6: `megatron.bridge.data.base`, imported for real. 0.5: `megatron.bridge.training.config`,
    of which only the contract classes are executed (from the real source). Only the package
    `__init__`s of `megatron.bridge` (model registry -> TE) and `megatron.bridge.data`
    (Hugging Face `datasets`) are skipped; everything is restored after.
    """
    relative, module_name = bridge.contracts
    bridge.source(relative)
    saved_modules = {k: v for k, v in sys.modules.items() if _ours(k)}
    saved_path = list(sys.path)
    sys.path.insert(0, str(bridge.site))
    for name in [m for m in sys.modules if _ours(m)]:
        del sys.modules[name]
    for name, sub in (("megatron.bridge", ""), ("megatron.bridge.data", "data")):
        package = types.ModuleType(name)
        package.__path__ = [str(bridge.site / "megatron" / "bridge" / sub)]
        sys.modules[name] = package
    try:
        if module_name == "megatron.bridge.data.base":
            yield importlib.import_module(module_name)
        else:
            importlib.import_module("megatron.bridge.training")  # the real (empty) package
            module = exec_from_source(
                bridge.source(relative), module_name, {"DataloaderConfig", "DatasetBuildContext", "DatasetProvider"},
                {}, imports_from=("abc", "dataclasses", "typing", "megatron.core.process_groups_config",
                                  "megatron.bridge.training.tokenizers.tokenizer"))
            sys.modules[module_name] = module
            yield module
    finally:
        for name in [m for m in sys.modules if _ours(m)]:
            del sys.modules[name]
        sys.modules.update(saved_modules)
        sys.path[:] = saved_path


# ---------------------------------------------------------------------------------------------
# recipe -> ConfigContainer sections
# ---------------------------------------------------------------------------------------------
def sections(name="stage_512k", start=None, overrides=()):
    recipe = load_recipe(name, list(overrides))
    return recipe, bridge_sections(recipe, start or StartPoint("chain", load="/ckpt/stage_64k"))


def test_sections_construct_the_megatron_base_configs():
    """Bridge's config classes subclass these; unknown or ill-typed values fail here."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.training import config as mt

    recipe, s = sections()
    train = mt.TrainingConfig(**s["train"])
    assert (train.global_batch_size, train.micro_batch_size, train.train_iters) == (16, 1, 2500)
    sched = mt.SchedulerConfig(**s["scheduler"])
    assert (sched.lr_warmup_iters, sched.lr_decay_iters, sched.lr_decay_style) == (250, 2500, "cosine")
    assert sched.override_opt_param_scheduler and not sched.use_checkpoint_opt_param_scheduler
    opt = OptimizerConfig(**s["optimizer"], params_dtype=torch.bfloat16)
    assert (opt.lr, opt.min_lr, opt.adam_beta1, opt.adam_beta2, opt.weight_decay, opt.clip_grad) == \
        (5e-6, pytest.approx(5e-7), 0.9, 0.95, 0.1, 1.0)
    assert opt.optimizer == "adam" and opt.bf16 and opt.use_distributed_optimizer
    ddp = DistributedDataParallelConfig(**s["ddp"])
    assert ddp.average_in_collective is False and ddp.grad_reduce_in_fp32  # per-token loss
    ck = mt.CheckpointConfig(**s["checkpoint"])
    assert (ck.save, ck.load, ck.save_interval, ck.load_optim) == (recipe.checkpoint.dir, "/ckpt/stage_64k", 125, True)
    assert ck.pretrained_checkpoint is None and ck.load_rng is False
    # no stage loads stage 2's Adam state in another tp / pp: the DP-reshardable format, no gather
    assert ck.dist_ckpt_optim_fully_reshardable is False
    log = mt.LoggerConfig(**s["logger"])
    assert log.log_throughput and log.log_interval == 1
    assert mt.RNGConfig(**s["rng"]).seed == 1234
    assert mt.ValidationConfig(**s["validation"]).eval_iters == 0
    tok = mt.TokenizerConfig(**s["tokenizer"])
    assert (tok.tokenizer_type, tok.vocab_size) == ("NullTokenizer", 128256)


def test_model_overrides_are_transformer_config_fields():
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = base_fields(TransformerConfig)
    for name in ("stage_64k", "sft"):
        over = model_overrides(load_recipe(name))
        assert set(over) <= fields
        assert over == dict(calculate_per_token_loss=True, recompute_granularity="full",
                            recompute_method="uniform", recompute_num_layers=1)
    assert model_overrides(load_recipe("stage_64k", ["parallel.recompute=none"]))["recompute_granularity"] is None


def test_resume_and_weights_only_starts_keep_checkpoint_schedules():
    _, resume = sections("stage_512k", StartPoint("resume", load="/runs/512k"))
    assert resume["scheduler"]["use_checkpoint_opt_param_scheduler"]
    assert not resume["scheduler"]["override_opt_param_scheduler"]
    assert resume["checkpoint"]["load_rng"]
    _, weights = sections("sft", StartPoint("weights", load="/runs/sft", pretrained="/runs/512k"))
    assert (weights["checkpoint"]["load"], weights["checkpoint"]["pretrained_checkpoint"]) == ("/runs/sft", "/runs/512k")


def test_bridge_override_sections_are_the_pinned_config_container_fields(bridge):
    """`bridge.<section>.<field>=...`: every section the recipe schema declares is a field of
    the pinned release's ConfigContainer (0.5.0 and 0.6.2)."""
    from prolong_nemo.recipes.config import BridgeOverrides

    container = dataclass_fields(bridge.source("training/config.py"), "ConfigContainer")
    declared = {f.name for f in dataclasses.fields(BridgeOverrides)}
    assert declared <= set(container), declared - set(container)
    assert {"ddp", "checkpoint", "model", "train", "optimizer", "logger"} <= declared


def test_bridge_overrides_apply_after_the_mapping_and_name_a_bad_field():
    from prolong_nemo.training.bridge.sections import apply_bridge_overrides

    @dataclasses.dataclass
    class Inner:
        depth: int = 1

    @dataclasses.dataclass
    class DDP:
        bucket_size: int | None = None
        overlap_grad_reduce: bool = True
        inner: Inner = dataclasses.field(default_factory=Inner)

    container = SimpleNamespace(ddp=DDP(), checkpoint=None)
    recipe = load_recipe("stage_64k", ["bridge.ddp.bucket_size=100000000", "bridge.ddp.overlap_grad_reduce=false",
                                       "bridge.ddp.inner.depth=3"])
    apply_bridge_overrides(container, recipe.bridge)
    assert container.ddp == DDP(bucket_size=100_000_000, overlap_grad_reduce=False, inner=Inner(depth=3))
    with pytest.raises(RecipeError, match=r"^bridge.ddp.bucket_sise: DDP has no field 'bucket_sise'; did you "
                                          r"mean bucket_size\?$"):
        apply_bridge_overrides(container, load_recipe("stage_64k", ["bridge.ddp.bucket_sise=1"]).bridge)
    with pytest.raises(RecipeError, match=r"^bridge.checkpoint: this Megatron-Bridge's ConfigContainer has no "):
        apply_bridge_overrides(container, load_recipe("stage_64k", ["bridge.checkpoint.async_save=true"]).bridge)


def test_bridge_config_fields_exist_in_the_pinned_release(bridge):
    """Bridge-level fields (beyond the megatron base classes) checked against Bridge's source."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.training import config as mt

    config_py = bridge.source("training/config.py")
    container = dataclass_fields(config_py, "ConfigContainer")
    passed = {"train", "validation", "model", "optimizer", "ddp", "scheduler", "dataset", "logger",
              "tokenizer", "checkpoint", "rng", "mixed_precision"}
    assert passed <= set(container)
    assert {f for f, has_default in container.items() if not has_default} <= passed
    _, s = sections()
    pairs = {"TrainingConfig": mt.TrainingConfig, "SchedulerConfig": mt.SchedulerConfig,
             "CheckpointConfig": mt.CheckpointConfig, "LoggerConfig": mt.LoggerConfig,
             "OptimizerConfig": OptimizerConfig, "DistributedDataParallelConfig": DistributedDataParallelConfig}
    section_of = {"TrainingConfig": "train", "SchedulerConfig": "scheduler", "CheckpointConfig": "checkpoint",
                  "LoggerConfig": "logger", "OptimizerConfig": "optimizer", "DistributedDataParallelConfig": "ddp"}
    for cls_name, base in pairs.items():
        known = set(dataclass_fields(config_py, cls_name)) | base_fields(base)
        assert set(s[section_of[cls_name]]) <= known, cls_name
    # every class bridge.py takes from `megatron.bridge.training.config` is bound there
    module_names = {a.asname or a.name for n in ast.walk(ast.parse(config_py.read_text()))
                    if isinstance(n, ast.ImportFrom) for a in n.names}
    module_names |= {n.name for n in ast.parse(config_py.read_text()).body if isinstance(n, ast.ClassDef)}
    used = set(re.findall(r"\bbc\.(\w+)", (REPO / "prolong_nemo/training/bridge/config.py").read_text()))
    assert {"ConfigContainer", "RNGConfig", "ValidationConfig", "TrainingConfig"} <= used <= module_names, \
        used - module_names
    tokenizer = dataclass_fields(bridge.source("training/tokenizers/config.py"), "TokenizerConfig")
    assert set(s["tokenizer"]) <= set(tokenizer) | base_fields(mt.TokenizerConfig)
    # bf16 mixed precision by name, as bridge.py asks for it
    assert "bf16_mixed" in {n.name for n in ast.walk(ast.parse(bridge.source("training/mixed_precision.py").read_text()))
                            if isinstance(n, ast.FunctionDef)}


def test_dataset_provider_contract(bridge):
    contracts, contracts_module = bridge.contracts
    base_py = bridge.source(contracts)
    loader = dataclass_fields(base_py, "DataloaderConfig")
    context = dataclass_fields(base_py, "DatasetBuildContext")
    assert {"train_samples", "valid_samples", "test_samples"} <= set(context)
    ours = dataclass_fields(REPO / "prolong_nemo/training/bridge/config.py", "ProLongDatasetProvider")
    assert all(ours.values()), "provider fields need defaults (kw_only dataclass after Bridge's)"
    fields = dataset_fields(load_recipe("stage_512k"))
    assert set(fields) <= set(loader) | set(ours)
    assert fields["dataloader_type"] == "single"  # resume from consumed_train_samples
    assert set(ours) <= set(inspect.signature(build_prolong_datasets).parameters)
    # Bridge's protocol adapter calls build_datasets(context) for DatasetProvider instances
    utils_py = bridge.source("data/utils.py")
    utils = utils_py.read_text()
    assert "config.build_datasets(context)" in utils and "isinstance(dataset_config, DatasetProvider)" in utils
    # ... with the classes of the module bridge.py subclasses in this release (0.5: training.config)
    imported = {a.name: n.module for n in ast.parse(utils).body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert imported["DatasetProvider"] == imported["DatasetBuildContext"] == contracts_module
    # and its loader uses a dataset's collate_fn attribute when there is one
    assert 'collate_fn=train_ds.collate_fn if hasattr(train_ds, "collate_fn")' in bridge.source("data/loaders.py").read_text()


def test_pretrain_and_forward_step_signatures(bridge):
    assert function_params(bridge.source("training/pretrain.py"), "pretrain") == \
        ["config", "forward_step_func", "callbacks"]
    from prolong_nemo.training.forward_step import StepOptions, make_forward_step

    step = make_forward_step(StepOptions(partition_for_cp=True))
    assert list(inspect.signature(step).parameters) == ["data_iterator", "model"]
    # Bridge's TrainState counters are the ones the chaining callback resets
    state = dataclass_fields(bridge.source("training/state.py"), "TrainState")
    assert set(TRAIN_STATE_COUNTERS) <= set(state)
    assert {k for k in state if k not in TRAIN_STATE_COUNTERS} == {"do_train", "do_valid", "do_test"}
    # the entry script is valid Python and calls bridge.main
    entry = (REPO / "recipes/bridge_entry.py").read_text()
    compile(entry, "bridge_entry.py", "exec")
    assert "from prolong_nemo.training.bridge.main import main" in entry
    for module in ("config", "main", "callbacks"):
        path = REPO / "prolong_nemo/training/bridge" / f"{module}.py"
        compile(path.read_text(), str(path), "exec")


# ---------------------------------------------------------------------------------------------
# Stage chaining and progress logging through Bridge's real callback manager
# ---------------------------------------------------------------------------------------------
def previous_stage_optimizer():
    """An optimizer + megatron scheduler as stage 1 leaves them after 5,000 steps.

    In Bridge's units: its scheduler counts samples (warmup / decay = iterations x global batch
    64, `scheduler.step(64)` per iteration), see test_bridge_scheduler_counts_samples.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([{"params": [w], "max_lr": 1e-5, "min_lr": 1e-6, "wd_mult": 1.0}], lr=1e-6)
    sched = OptimizerParamScheduler(opt, init_lr=0.0, max_lr=1e-5, min_lr=1e-6, lr_warmup_steps=500 * 64,
                                    lr_decay_steps=5000 * 64, lr_decay_style="cosine", start_wd=0.1, end_wd=0.1,
                                    wd_incr_steps=5000 * 64, wd_incr_style="constant")
    sched.step(5000 * 64)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-6)
    return opt, sched


def test_bridge_scheduler_counts_samples(bridge):
    """Why the chaining schedule is in samples: Bridge sizes and advances its scheduler that way."""
    config = bridge.source("training/config.py").read_text()
    assert "self.scheduler.lr_decay_steps = self.scheduler.lr_decay_iters * self.train.global_batch_size" in config
    assert "self.scheduler.lr_warmup_steps = self.scheduler.lr_warmup_iters * self.train.global_batch_size" in config
    train = bridge.source("training/train.py").read_text()
    assert "increment = get_num_microbatches() * train_config.micro_batch_size * cfg.data_parallel_size" in train
    assert "scheduler.step(increment=increment)" in train
    recipe = load_recipe("stage_512k")
    assert schedule_of(recipe, increment=16) == dict(max_lr=5e-6, min_lr=pytest.approx(5e-7),
                                                     warmup_steps=250 * 16, decay_steps=2500 * 16)
    assert schedule_of(recipe, increment=1)["decay_steps"] == 2500  # the CPU runner steps by 1


def bridge_scheduler_config(recipe):
    """cfg.scheduler after Bridge's finalize: lr_*_steps = iterations x global batch."""
    gbs = recipe.train.global_batch_size
    return SimpleNamespace(lr_warmup_steps=recipe.warmup_steps * gbs, lr_decay_steps=recipe.train.steps * gbs)


def test_stage_chain_callback_restarts_schedule(bridge_callbacks):
    from prolong_nemo.training.bridge.callbacks import StageChainCallback

    recipe = load_recipe("stage_512k")
    opt, sched = previous_stage_optimizer()
    train_state = SimpleNamespace(step=5000, consumed_train_samples=320000, skipped_train_samples=3,
                                  consumed_valid_samples=7, floating_point_operations_so_far=1e21,
                                  do_train=True, do_valid=False, do_test=False)
    state = SimpleNamespace(train_state=train_state, cfg=SimpleNamespace(
        checkpoint=SimpleNamespace(load="/s1"), scheduler=bridge_scheduler_config(recipe)))
    manager = bridge_callbacks.CallbackManager()
    logs = []
    callback = StageChainCallback("/s1", schedule_of(recipe, increment=16), log=logs.append)
    manager.add(callback)
    assert manager.has_callbacks("on_data_init_start")
    manager.fire("on_data_init_start", bridge_callbacks.CallbackContext(
        state=state, model=[], optimizer=opt, scheduler=sched))
    assert callback.applied
    assert all(getattr(train_state, c) == 0 for c in TRAIN_STATE_COUNTERS)
    assert train_state.do_train  # untouched
    assert sched.num_steps == 0 and opt.param_groups[0]["lr"] == 0.0
    assert opt.param_groups[0]["max_lr"] == 5e-6
    assert "restarted at 0" in logs[0]

    def iterations(n):  # as Bridge's train step does: one global batch (16 samples) per iteration
        for _ in range(n):
            sched.step(increment=16)
        return opt.param_groups[0]["lr"]

    assert iterations(125) == pytest.approx(2.5e-6)  # half way through the 250-step warmup
    assert iterations(125) == pytest.approx(5e-6)  # end of warmup: this stage's peak
    assert iterations(1125) == pytest.approx(2.75e-6)  # half way down the cosine (250 + 2250 / 2)
    assert iterations(1125) == pytest.approx(5e-7)  # step 2,500: cosine to 10%


def test_stage_chain_callback_refuses_another_checkpoint(bridge_callbacks):
    from prolong_nemo.training.bridge.callbacks import StageChainCallback

    recipe = load_recipe("stage_512k")
    opt, sched = previous_stage_optimizer()
    state = SimpleNamespace(train_state=SimpleNamespace(step=9), cfg=SimpleNamespace(
        checkpoint=SimpleNamespace(load="/runs/512k")))
    with pytest.raises(RuntimeError, match="expects checkpoint.load"):
        StageChainCallback("/s1", schedule_of(recipe, increment=16)).on_data_init_start(
            bridge_callbacks.CallbackContext(state=state, model=[], optimizer=opt, scheduler=sched))
    # a schedule in other units than Bridge's scheduler (iterations instead of samples) is refused
    state = SimpleNamespace(train_state=SimpleNamespace(step=9), cfg=SimpleNamespace(
        checkpoint=SimpleNamespace(load="/s1"), scheduler=bridge_scheduler_config(recipe)))
    with pytest.raises(RuntimeError, match="differs from Bridge's scheduler"):
        StageChainCallback("/s1", schedule_of(recipe, increment=1)).on_data_init_start(
            bridge_callbacks.CallbackContext(state=state, model=[], optimizer=opt, scheduler=sched))


def test_progress_callback_logs_every_interval(bridge_callbacks):
    from prolong_nemo.training.bridge.callbacks import ProgressLogCallback

    meter = ProgressMeter(total_steps=100, tokens_per_step=4_194_304, flops_per_step=4e17, world_size=8)
    logs = []
    manager = bridge_callbacks.CallbackManager()
    manager.add(ProgressLogCallback(meter, interval=5, log=logs.append))
    opt, sched = previous_stage_optimizer()
    for step in range(10):
        ctx = bridge_callbacks.CallbackContext(state=SimpleNamespace(train_state=SimpleNamespace(step=step)), model=[],
                                               optimizer=opt, scheduler=sched, loss_dict={"lm loss": torch.tensor(2.5)})
        manager.fire("on_train_step_start", ctx)
        manager.fire("on_train_step_end", ctx)
    assert len(logs) == 2
    assert logs[0].startswith("[prolong] step 5/100 (5.0%) | lm loss 2.5000 | lr 1.000e-06")
    assert "tokens/s" in logs[1] and "model TFLOP/s/GPU" in logs[1] and "ETA" in logs[1]


def test_progress_meter_numbers():
    meter = ProgressMeter(total_steps=5000, tokens_per_step=4_194_304, flops_per_step=4e17, world_size=8)
    line = meter.line(step=101, loss=2.0, step_seconds=200.0, memory_bytes=61.5e9, lr=1e-5, now=1000.0)
    # first logged step: ETA from this step alone; 4,194,304 tokens in 200 s
    assert line == ("step 101/5000 (2.0%) | lm loss 2.0000 | lr 1.000e-05 | tokens/s 20,972 | "
                    "model TFLOP/s/GPU 250 | mem 61.50 GB | ETA 11d08:10:00")
    assert format_duration(4899 * 200) == "11d08:10:00"  # 979,800 s = 11 x 86,400 + 8 h 10 min
    later = meter.line(step=102, loss=2.0, step_seconds=100.0, memory_bytes=None, now=1100.0)
    assert later.endswith("ETA 8d12:05:00")  # 300 s for 2 steps -> 150 s x 4898 = 734,700 s


def test_model_flops_hand_computed():
    l3 = preset("llama3-8b")
    matmul = 32 * 218_103_808 + 128256 * 4096  # embedding lookup has no FLOPs; the output layer does
    # causal over one 64K document: (s + 1) / 2 keys per query on average (the diagonal
    # counts; model/flops.py, checked against torch's FlopCounterMode in tests/test_flops.py)
    attention = 32 * 4 * 4096 * (65536 + 1) / 2
    assert model_flops_per_token(l3, 65536) == 3 * (2 * matmul + attention) == 96_568_344_576
    meter = ProgressMeter.for_recipe(load_recipe("stage_64k"))
    assert meter.flops_per_step == 96_568_344_576 * 4_194_304 and meter.world_size == 8


# ---------------------------------------------------------------------------------------------
# Start points (resume / chain / weights / fresh)
# ---------------------------------------------------------------------------------------------
def make_ckpt(root: Path) -> str:
    root.mkdir(parents=True, exist_ok=True)
    (root / "latest_checkpointed_iteration.txt").write_text("125\n")
    return str(root)


def test_resolve_start(tmp_path):
    prev = make_ckpt(tmp_path / "s1")
    own = tmp_path / "s2"
    args = [f"checkpoint.dir={own}", f"checkpoint.init_from={prev}"]
    recipe = load_recipe("stage_512k", args)
    assert resolve_start(recipe) == StartPoint("chain", load=prev)
    make_ckpt(own)  # the resubmitted job finds its own checkpoint
    assert resolve_start(recipe) == StartPoint("resume", load=str(own))
    sft = load_recipe("sft", [f"checkpoint.dir={tmp_path / 'sft'}", f"checkpoint.init_from={prev}"])
    assert resolve_start(sft) == StartPoint("weights", load=str(tmp_path / "sft"), pretrained=prev)
    fresh = load_recipe("stage_64k_cpu", [f"checkpoint.dir={tmp_path / 'x'}"])
    assert resolve_start(fresh).kind == "fresh"
    with pytest.raises(RecipeError, match="holds no Megatron checkpoint"):
        resolve_start(load_recipe("sft", [f"checkpoint.dir={tmp_path / 'y'}", f"checkpoint.init_from={tmp_path / 'no'}"]))
    # an iteration directory (Bridge's pretrained_checkpoint layout) is accepted as well
    it = tmp_path / "hf" / "iter_0000000"
    it.mkdir(parents=True)
    (it / ".metadata").write_bytes(b"")
    r = load_recipe("stage_64k", [f"checkpoint.dir={tmp_path / 'z'}", f"checkpoint.init_from={it}"])
    assert resolve_start(r) == StartPoint("weights", load=str(tmp_path / "z"), pretrained=str(it))


def test_restart_schedule_replaces_checkpoint_schedule():
    opt, sched = previous_stage_optimizer()
    restart_schedule(sched, opt, max_lr=2e-5, min_lr=2e-6, warmup_steps=13, decay_steps=250)
    assert (sched.max_lr, sched.min_lr, sched.lr_warmup_steps, sched.lr_decay_steps) == (2e-5, 2e-6, 13, 250)
    sched.step(13)
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-5)


# ---------------------------------------------------------------------------------------------
# The dataset provider's build on real MDS data
# ---------------------------------------------------------------------------------------------
def test_build_prolong_datasets_on_mds(tmp_path):
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from data_fixtures import write_random_domain
    finally:
        sys.path.pop(0)
    write_random_domain(tmp_path / "long", n=6, length=256, seed=1)
    write_random_domain(tmp_path / "short", n=6, length=256, seed=2)
    recipe = load_recipe("stage_512k", [f"data.root={tmp_path}", "data.sequence_length=256",
                                        "data.mixture=[{path: long, proportion: 0.6}, {path: short, proportion: 0.4}]"])
    f = dataset_fields(recipe)
    assert f["cp_size"] == 4 and f["tp_size"] == 2 and f["sequence_parallel"]
    kwargs = {k: f[k] for k in ("domains", "seq_length", "seed", "document_masking", "cp_size", "tp_size",
                                "sequence_parallel", "vocab_size", "cache_dir")}
    train, valid, test = build_prolong_datasets(**kwargs, train_samples=20)
    assert valid is None and test is None
    assert len(train) == 20 and train.collate_fn is not None
    batch = train.collate_fn([train[3]])
    cu = batch["cu_seqlens_q_padded"][0].numpy()
    assert np.all(np.diff(cu) % 8 == 0) and cu[-1] == batch["tokens"].shape[1]  # 2*cp multiples
    # the mixture is respected: 12 of 20 samples from "long" (60%)
    domains = [train.dataset_index[i] for i in range(20)]
    assert sum(1 for d in domains if d == 0) == 12


def test_dataset_provider_through_the_real_bridge_contract(bridge_data, tmp_path):
    """bridge.py imported on Bridge's real DatasetProvider; built as Bridge's adapter builds it."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from data_fixtures import write_random_domain
    finally:
        sys.path.pop(0)
    from prolong_nemo.training.bridge.config import ProLongDatasetProvider

    write_random_domain(tmp_path / "long", n=6, length=256, seed=1)
    write_random_domain(tmp_path / "short", n=6, length=256, seed=2)
    recipe = load_recipe("stage_512k", [f"data.root={tmp_path}", "data.sequence_length=256", "data.num_workers=0",
                                        "data.mixture=[{path: long, proportion: 0.6}, {path: short, proportion: 0.4}]"])
    provider = ProLongDatasetProvider(**dataset_fields(recipe))
    assert isinstance(provider, bridge_data.DatasetProvider) and isinstance(provider, bridge_data.DataloaderConfig)
    assert provider.dataloader_type == "single" and provider.seq_length == 256 and provider.cp_size == 4
    provider.finalize()  # DataloaderConfig.finalize, as ConfigContainer.validate calls it
    assert provider.persistent_workers is False  # num_workers 0
    # what Bridge's protocol adapter (data/utils.py get_dataset_provider) passes
    context = bridge_data.DatasetBuildContext(train_samples=20, valid_samples=0, test_samples=0, tokenizer=None)
    train, valid, test = provider.build_datasets(context)
    assert len(train) == 20 and valid is None and test is None and train.collate_fn is not None
    with pytest.raises(TypeError):  # Bridge's fields are keyword-only: no positional mix-ups
        ProLongDatasetProvider("single")


def test_callbacks_for_a_chained_stage(bridge, bridge_data):
    """bridge.py's wiring: the chain callback gets this stage's schedule in Bridge's units."""
    from prolong_nemo.training.bridge.callbacks import (
        ModelRecordCallback,
        ProgressLogCallback,
        SignalTrapCallback,
        StageChainCallback,
    )
    from prolong_nemo.training.bridge.config import bridge_version
    from prolong_nemo.training.bridge.main import callbacks_for

    assert bridge_version() == tuple(map(int, bridge.version.split(".")))
    # Bridge 0.5 builds the SIGTERM trap of exit_signal_handler without installing it: we do
    trap = [] if bridge.installs_signal_trap else [SignalTrapCallback]
    recipe = load_recipe("stage_512k")
    callbacks = callbacks_for(recipe, StartPoint("chain", load="/runs/64k"), log=lambda _: None)
    assert [type(c) for c in callbacks] == trap + [ModelRecordCallback, StageChainCallback, ProgressLogCallback]
    chain = callbacks[-2]
    assert chain.init_from == "/runs/64k"
    assert chain.schedule == dict(max_lr=5e-6, min_lr=pytest.approx(5e-7), warmup_steps=250 * 16,
                                  decay_steps=2500 * 16)  # samples: iterations x global batch 16
    resume = callbacks_for(recipe, StartPoint("resume", load="/runs/512k"), log=lambda _: None)
    assert [type(c) for c in resume] == trap + [ModelRecordCallback, ProgressLogCallback]
    record = resume[-2]  # /runs/512k does not exist here: no ids known, the architecture is the recipe's
    assert record.hf_extras is None and record.arch == recipe.arch.replace(max_position_embeddings=524288)


# ---------------------------------------------------------------------------------------------
# Differences between the pinned releases that the glue handles
# ---------------------------------------------------------------------------------------------
def test_exit_signal_handler_installs_the_trap(bridge, bridge_callbacks):
    """`exit_signal_handler=True` (bridge_sections) must trap SIGTERM so Bridge saves and exits.

    Bridge 0.6 enters its DistributedSignalHandler when the config is set; 0.5 only constructs
    it, so no OS handler exists and a Slurm SIGTERM kills the ranks without a checkpoint.
    SignalTrapCallback enters Bridge's own handler at on_data_init_start (before the data loaders
    fork their workers, which then inherit it as under 0.6); on an entered one it does nothing.
    Signal: SIGUSR2 (the test process keeps its SIGTERM disposition).
    """
    from prolong_nemo.training.bridge.callbacks import SignalTrapCallback

    state_py = bridge.source("training/state.py").read_text()
    built = re.search(r"self\._signal_handler = DistributedSignalHandler\(self\.cfg\.train\.exit_signal\)(.*)",
                      state_py)
    assert built and built.group(1).startswith(".__enter__()") == bridge.installs_signal_trap
    train_py = bridge.source("training/train.py").read_text()
    assert "if any(signal_handler.signals_received()):" in train_py  # the polled exit branch
    setup_py = bridge.source("training/setup.py").read_text()  # the event fires before the data loaders
    assert setup_py.index('callback_manager.fire("on_data_init_start"') < setup_py.index("setup_data_iterators(")
    sig_utils = importlib.import_module("megatron.bridge.training.utils.sig_utils")

    def context(handler, enabled=True):
        state = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(exit_signal_handler=enabled)),
                                signal_handler=handler)
        return bridge_callbacks.CallbackContext(state=state, model=[])

    previous = signal.getsignal(signal.SIGUSR2)
    handler = sig_utils.DistributedSignalHandler(signal.SIGUSR2)  # as Bridge 0.5's GlobalState leaves it
    try:
        assert signal.getsignal(signal.SIGUSR2) is previous  # constructed, not installed
        manager = bridge_callbacks.CallbackManager()
        callback = SignalTrapCallback()
        manager.add(callback)
        manager.fire("on_data_init_start", context(handler, enabled=False))
        assert not callback.installed and signal.getsignal(signal.SIGUSR2) is previous
        manager.fire("on_data_init_start", context(handler))
        assert callback.installed
        installed = signal.getsignal(signal.SIGUSR2)
        assert installed is not previous and installed.__qualname__.startswith("DistributedSignalHandler.__enter__")
        assert handler.signals_received() == [False]
        signal.raise_signal(signal.SIGUSR2)  # the handler runs before this returns
        assert handler.signals_received() == [True]  # Bridge's loop now saves and exits
        # an entered handler (Bridge 0.6) is left alone
        again = SignalTrapCallback()
        again.on_data_init_start(context(handler))
        assert not again.installed and signal.getsignal(signal.SIGUSR2) is installed
    finally:
        signal.signal(signal.SIGUSR2, previous)


def packed_batch(tmp_path):
    """One collated row of the data adapter (docs/batch-contract.md), CP 4 / TP 2 with SP."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from data_fixtures import write_random_domain
    finally:
        sys.path.pop(0)
    write_random_domain(tmp_path / "long", n=4, length=256, seed=3)
    f = dataset_fields(load_recipe("stage_512k", [f"data.root={tmp_path}", "data.sequence_length=256",
                                                  "data.mixture=[{path: long, proportion: 1.0}]"]))
    kwargs = {k: f[k] for k in ("domains", "seq_length", "seed", "document_masking", "cp_size", "tp_size",
                                "sequence_parallel", "vocab_size", "cache_dir")}
    train, _, _ = build_prolong_datasets(**kwargs, train_samples=2)
    batch = train.collate_fn([train[0]])
    assert batch["cu_seqlens_q"].shape[1] > 2  # several documents in the row
    return batch


def test_stock_get_batch_reads_our_packed_keys(bridge, bridge_callbacks, tmp_path, monkeypatch):
    """Bridge's own gpt_step.get_batch, run on our collated batch, yields the attention layout our
    forward step builds (our forward step reads the 0.6 keys itself; the legacy keys are for
    Bridge 0.5's stock path). Functions run from the real gpt_step source (the module needs TE),
    the packed-seq helper is imported for real."""
    from prolong_nemo.training.forward_step import packed_seq_params

    batch = packed_batch(tmp_path)
    ours = packed_seq_params(batch)
    gpt_step = bridge.source("training/gpt_step.py")
    current = "cu_seqlens_q" in bridge.packed_keys  # 0.6 reads the current key names (0.5 the legacy ones)
    names = {"get_batch_from_iterator"} | ({
        "_CURRENT_PACKED_SEQ_DEVICE_KEYS", "_CURRENT_PACKED_SEQ_HOST_KEYS", "_CURRENT_PACKED_SEQ_PARAM_KEYS",
        "_LEGACY_PACKED_SEQ_DEVICE_KEYS", "_LEGACY_PACKED_SEQ_HOST_KEYS", "_LEGACY_PACKED_SEQ_PARAM_KEYS",
        "_PackedMetadataValue", "_packed_metadata_for_forward", "_cu_seqlens_for_cp_partition",
        "_trim_padded_cu_seqlens_for_cp"} if current else set())
    step = exec_from_source(gpt_step, "gpt_step_under_test", names, {"torch": torch}, lazy_annotations=True)
    packed_seq_utils = importlib.import_module("megatron.bridge.training.utils.packed_seq_utils")
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # device keys stay on the CPU

    got = step.get_batch_from_iterator(iter([dict(batch)]), False, True, is_first_pp_stage=True,
                                       is_last_pp_stage=True)
    assert {k for k, v in got.items() if v is not None} == \
        {"tokens", "labels", "loss_mask", "position_ids", *bridge.packed_keys}
    if current:
        metadata_ = step._packed_metadata_for_forward(got)
        cp_boundaries = step._cu_seqlens_for_cp_partition(got)
    else:
        # _forward_step_common passes these five (None where absent) to get_packed_seq_params ...
        legacy = ("cu_seqlens", "cu_seqlens_argmin", "max_seqlen", "cu_seqlens_unpadded", "cu_seqlens_unpadded_argmin")
        source = gpt_step.read_text()
        assert all(f'"{k}": {k},' in source for k in legacy)
        metadata_ = {k: got.get(k) for k in legacy}
        # ... and _partition_packed_batch_for_cp gives TE's thd_get_partitioned_indices the
        # untrimmed cu_seqlens: valid because ours has no -1 fill (argmin == its length)
        assert 'cu_seqlens = batch["cu_seqlens"]' in source
        assert int(got["cu_seqlens_argmin"]) == got["cu_seqlens"].shape[1]
        cp_boundaries = got["cu_seqlens"].squeeze()
    params = packed_seq_utils.get_packed_seq_params(metadata_)
    assert params.qkv_format == "thd" and params.cu_seqlens_q.dtype == torch.int32
    assert torch.equal(params.cu_seqlens_q, ours.cu_seqlens_q) and torch.equal(params.cu_seqlens_kv, ours.cu_seqlens_kv)
    # 0.5 leaves the padded boundaries unset (TE then uses cu_seqlens_q, identical here)
    for padded in (params.cu_seqlens_q_padded, params.cu_seqlens_kv_padded):
        assert padded is None if not current else torch.equal(padded, ours.cu_seqlens_q_padded)
    assert int(params.max_seqlen_q) == int(params.max_seqlen_kv) == ours.max_seqlen_q
    assert torch.equal(cp_boundaries, ours.cu_seqlens_q_padded)
    assert int(cp_boundaries[-1]) == batch["tokens"].shape[1] and bool(torch.all(torch.diff(cp_boundaries) % 8 == 0))


# ---------------------------------------------------------------------------------------------
# The model record of every checkpoint Bridge saves (architecture + bos/eos ids for the export)
# ---------------------------------------------------------------------------------------------
class AsyncRequest:
    """What `dist_checkpointing.save(async_sharded_save=True)` returns: Bridge appends its finalize
    steps (train state, tracker, run_config.yaml, barrier, on_checkpoint_save) to run them once the
    background write is done, which is iterations later."""

    def __init__(self) -> None:
        self.finalize_fns: list = []

    def add_finalize_fn(self, fn) -> None:
        self.finalize_fns.append(fn)

    def finalize(self) -> None:
        for fn in self.finalize_fns:
            fn()


def bridge_save_checkpoint(bridge, bridge_callbacks, write_weights, bridge_run_config: dict):
    """Bridge's own `save_checkpoint`, executed from the release's training/checkpointing.py.

    Real: the whole function body (which files it writes in which order, its barriers, sync and
    async finalization and where it fires `on_checkpoint_save`), the path helpers of
    training/utils/checkpoint_utils.py, `TrainState` (training/state.py) and the callback module.
    Stubbed (the module needs TE / modelopt): what needs a model or process groups (state dict,
    RNG, save strategies, W&B) and `dist_checkpointing.save`, replaced by `write_weights(folder)`;
    `cfg.to_yaml` writes `bridge_run_config`. One process, rank 0. Returns (save, TrainState,
    scheduled async requests).
    """
    import logging
    import shutil
    import time

    from megatron.core.msc_utils import MultiStorageClientFeature

    utils_names = {"get_checkpoint_name", "get_checkpoint_train_state_filename", "get_checkpoint_run_config_filename",
                   "get_checkpoint_tracker_filename", "ensure_directory_exists", "join_paths", "TRACKER_PREFIX",
                   "TRAIN_STATE_FILE", "CONFIG_FILE"}
    utils = exec_from_source(bridge.source("training/utils/checkpoint_utils.py"), "bridge_ckpt_utils_under_test",
                             utils_names, dict(os=os, Path=Path, MultiStorageClientFeature=MultiStorageClientFeature),
                             lazy_annotations=True)
    state_module = exec_from_source(bridge.source("training/state.py"), "bridge_state_under_test", {"TrainState"},
                                    {"torch": torch}, imports_from=("dataclasses", "typing",
                                                                    "torch.distributed.checkpoint.stateful"))
    noop = lambda *a, **k: None  # noqa: E731
    group = SimpleNamespace(rank=lambda: 0, size=lambda: 1)
    groups = SimpleNamespace(tp=group, pp=group, dp=group, dp_cp=group)
    reporter = SimpleNamespace(on_save_checkpoint_success=noop)  # W&B / MLflow / Comet
    scheduled: list[AsyncRequest] = []

    def dist_checkpointing_save(sharded_state_dict, checkpoint_dir, sharded_strategy=None, async_sharded_save=False,
                                validate_access_integrity=True, async_strategy="nvrx",
                                preprocess_common_before_consistancy_check=None, content_metadata=None):
        write_weights(Path(checkpoint_dir))  # the sync save has written its files when this returns
        return AsyncRequest() if async_sharded_save else None

    namespace = dict(
        torch=torch, os=os, shutil=shutil, time=time.time, inspect=inspect,  # `from time import time`
        logger=logging.getLogger("bridge_save_checkpoint_under_test"),
        CallbackContext=bridge_callbacks.CallbackContext, should_fire=bridge_callbacks.should_fire,
        MultiStorageClientFeature=MultiStorageClientFeature,
        **{n: getattr(utils, n) for n in utils_names},
        fault_tolerance=SimpleNamespace(on_checkpointing_start=noop, on_checkpointing_end=noop),
        unwrap_model=lambda m: m, get_pg_collection=lambda m: groups,
        get_rng_state=noop, get_rerun_state_machine=lambda: SimpleNamespace(state_dict=noop),
        maybe_save_dataloader_state=noop, is_empty_async_queue=lambda state: True,
        LayerWiseDistributedOptimizer=type("LayerWiseDistributedOptimizer", (), {}),
        _build_sharded_state_dict_metadata=lambda *a: {"distrib_optim_sharding_type": "dp_reshardable"},
        generate_state_dict=lambda *a, **k: {},
        _get_model_glu_interleave_sizes=lambda *a: (None, None),
        TorchDistSaveShardedStrategy=noop, FullyParallelSaveStrategyWrapper=noop,
        get_default_save_sharded_strategy=noop,
        dist_checkpointing=SimpleNamespace(save=dist_checkpointing_save), _clean_metadata_for_serialization=lambda m: m,
        print_rank_0=noop, get_rank_safe=lambda: 0, is_last_rank=lambda: True,
        wandb_utils=reporter, mlflow_utils=reporter, comet_utils=reporter,
        schedule_async_save=lambda state, request: scheduled.append(request),
        cleanup_old_non_persistent_checkpoint=noop, append_to_progress_log=noop,
    )
    module = exec_from_source(bridge.source("training/checkpointing.py"), "bridge_checkpointing_under_test",
                              {"save_checkpoint", "CheckpointType", "_NON_PERSISTENT_CKPT_SUBDIR"}, namespace,
                              imports_from=("enum",), lazy_annotations=True)

    def save(save_dir: Path, step: int, callbacks: list, async_save: bool = False, train_state=None):
        import yaml

        manager = bridge_callbacks.CallbackManager()
        for callback in callbacks:
            manager.add(callback)
        checkpoint = SimpleNamespace(save=str(save_dir), async_save=async_save, ckpt_format="torch_dist",
                                     most_recent_k=-1, also_save_hf_checkpoint=False, storage_writers_per_rank=1,
                                     ckpt_assume_constant_structure=False, fully_parallel_save=True,
                                     async_strategy="nvrx", save_tokenizer_assets=False,
                                     non_persistent_ckpt_type=None)
        cfg = SimpleNamespace(checkpoint=checkpoint, optimizer=SimpleNamespace(use_distributed_optimizer=True),
                              rng=SimpleNamespace(data_parallel_random_init=False), peft=None, dataset=None, dist=None,
                              ddp=None, model=SimpleNamespace(), logger=SimpleNamespace(log_progress=False,
                                                                                       mlflow_log_artifacts=False),
                              to_yaml=lambda path: Path(path).write_text(yaml.safe_dump(bridge_run_config)))
        train_state = train_state or state_module.TrainState(step=step)
        state = SimpleNamespace(train_state=train_state, cfg=cfg, wandb_logger=None, mlflow_logger=None,
                                comet_logger=None)
        module.save_checkpoint(state, [], None, None, 0, callback_manager=manager)
        return state

    return save, state_module.TrainState, scheduled


def instruct_like_checkpoint(tmp_path: Path, arch, eos) -> Path:
    """A tiny HF model with Llama-3-Instruct ids, converted as the run's init_from checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prolong_nemo.convert import hf_to_megatron
    from prolong_nemo.convert.hf_config import HfExtras, hf_config_dict

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**hf_config_dict(arch, HfExtras(128000, eos)))).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf_instruct", safe_serialization=True)
    hf_to_megatron(tmp_path / "hf_instruct", tmp_path / "init", show_progress=False)
    return tmp_path / "init"


def copy_weights_from(iter_dir: Path):
    """The torch_dist files of `iter_dir` (a converted checkpoint of the same shape) as a save's weights."""
    import shutil

    def write(target: Path) -> None:
        for f in iter_dir.iterdir():
            if f.is_file() and (f.name.startswith((".metadata", "__")) or f.name in ("metadata.json", "common.pt")):
                shutil.copy(f, target / f.name)
    return write


def test_on_checkpoint_save_fires_after_bridge_wrote_the_checkpoint(bridge, bridge_callbacks, tmp_path):
    """What the record callback relies on, observed in the release's own save_checkpoint: the event
    fires (on every rank; here rank 0) after the weights, train_state.pt, the tracker and Bridge's
    run_config.yaml exist, with no path or iteration in the context (the tracker names the folder);
    under async save it fires at finalization, after train_state.step moved on."""
    import yaml

    seen = []

    class Probe(bridge_callbacks.Callback):
        def on_checkpoint_save(self, context):
            root = Path(context.state.cfg.checkpoint.save)
            tracker = (root / "latest_checkpointed_iteration.txt").read_text()
            folder = root / f"iter_{int(tracker):07d}"
            seen.append(dict(step=context.state.train_state.step, tracker=int(tracker),
                             files=sorted(p.name for p in folder.iterdir()),
                             run_config=yaml.safe_load((folder / "run_config.yaml").read_text()),
                             fields=sorted(f.name for f in dataclasses.fields(context)
                                           if getattr(context, f.name) is not None)))

    weights = tmp_path / "w"
    weights.mkdir()
    (weights / ".metadata").write_bytes(b"m")
    bridge_cfg = {"model": {"num_layers": 2}, "checkpoint": {"save_optim": True}}
    save, TrainState, scheduled = bridge_save_checkpoint(bridge, bridge_callbacks, copy_weights_from(weights),
                                                         bridge_cfg)
    save(tmp_path / "ck", 4, [Probe()])
    assert seen == [dict(step=4, tracker=4, files=[".metadata", "run_config.yaml", "train_state.pt"],
                         run_config=bridge_cfg, fields=["model", "state", "user_state"])]  # no optimizer passed here
    assert (tmp_path / "ck" / "latest_train_state.pt").is_file()
    # async: nothing is finalized (no tracker, no event) until the request is, iterations later
    train_state = TrainState(step=6)
    save(tmp_path / "ck", 6, [Probe()], async_save=True, train_state=train_state)
    assert len(seen) == 1 and (tmp_path / "ck" / "latest_checkpointed_iteration.txt").read_text() == "4"
    train_state.step = 8
    scheduled[-1].finalize()
    assert seen[-1]["step"] == 8 and seen[-1]["tracker"] == 6  # the context's step is the current one


def test_every_bridge_save_records_the_model_and_the_start_checkpoints_ids(bridge, bridge_callbacks, tmp_path):
    """Chain case: the 512K stage starts from a checkpoint recording Llama-3-Instruct's
    <|eot_id|> (128009); every checkpoint Bridge saves records it with this stage's architecture
    (its rope_theta and context), Bridge's run_config.yaml stays byte for byte Bridge's, and the
    HF export of the new stage's checkpoint stops on <|eot_id|>, not on base Llama-3's 128001."""
    import json

    import yaml

    from prolong_nemo.convert import megatron_to_hf
    from prolong_nemo.convert.hf_config import HfExtras
    from prolong_nemo.convert.megatron_io import read_recorded_config, resolve_iter_dir, run_config_dict
    from prolong_nemo.training.bridge.callbacks import ModelRecordCallback

    init = instruct_like_checkpoint(tmp_path, preset("llama3-tiny", rope_theta=8e6), eos=128009)
    recipe = load_recipe("stage_512k_cpu", [f"checkpoint.dir={tmp_path / 'run'}", f"checkpoint.init_from={init}"])
    start = resolve_start(recipe)
    assert start.kind == "chain"
    callback = ModelRecordCallback.for_start(recipe, start, log=lambda _: None)
    want = recipe.arch.replace(max_position_embeddings=4096)
    # Bridge's run_config.yaml: its `model:` (GPTModelProvider fields) and `checkpoint:` sections
    bridge_cfg = {k: v for k, v in run_config_dict(want, HfExtras()).items() if k != "prolong"}
    save, TrainState, scheduled = bridge_save_checkpoint(bridge, bridge_callbacks,
                                                         copy_weights_from(resolve_iter_dir(init)), bridge_cfg)
    for step in (2, 4):
        save(tmp_path / "run", step, [callback])
        folder = tmp_path / "run" / f"iter_{step:07d}"
        arch, extras = read_recorded_config(folder)
        assert arch == want and arch.rope_theta == 1.28e8
        assert (extras.bos_token_id, extras.eos_token_id) == (128000, 128009)
        assert yaml.safe_load((folder / "run_config.yaml").read_text()) == bridge_cfg  # Bridge's, untouched
        assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # written through a rename
    assert callback.recorded == [tmp_path / "run" / "iter_0000002", tmp_path / "run" / "iter_0000004"]
    megatron_to_hf(tmp_path / "run", tmp_path / "hf", show_progress=False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["rope_theta"]) == (128000, 128009, 1.28e8)
    assert config["max_position_embeddings"] == 4096
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == 128009
    # async save: the record goes to the folder that was saved, not to the current step's
    train_state = TrainState(step=6)
    save(tmp_path / "run", 6, [callback], async_save=True, train_state=train_state)
    train_state.step = 7
    scheduled[-1].finalize()
    assert read_recorded_config(tmp_path / "run" / "iter_0000006")[1].eos_token_id == 128009
    assert not (tmp_path / "run" / "iter_0000007").exists()
    # the resubmitted job resumes from its own checkpoint: the ids carry on from there
    resumed = resolve_start(recipe)
    assert resumed.kind == "resume"
    assert ModelRecordCallback.for_start(recipe, resumed, log=lambda _: None).hf_extras.eos_token_id == 128009


def test_record_callback_ids_for_each_start_kind(bridge, bridge_callbacks, tmp_path):
    """fresh: the preset's (base Llama-3) ids; weights: the pretrained checkpoint's; a start
    checkpoint that records none: the architecture only, so the export asks for --ids-from
    instead of writing base ids."""
    from prolong_nemo.convert import ConversionError, megatron_to_hf
    from prolong_nemo.convert.megatron_io import read_recorded_config, resolve_iter_dir
    from prolong_nemo.training.bridge.callbacks import ModelRecordCallback

    fresh = load_recipe("stage_64k_cpu", [f"checkpoint.dir={tmp_path / 'fresh'}"])
    assert resolve_start(fresh).kind == "fresh"
    callback = ModelRecordCallback.for_start(fresh, resolve_start(fresh), log=lambda _: None)
    assert callback.arch == fresh.arch.replace(max_position_embeddings=4096)  # the preset's is longer than 512
    assert (callback.hf_extras.bos_token_id, callback.hf_extras.eos_token_id) == (128000, 128001)

    init = instruct_like_checkpoint(tmp_path, preset("llama3-tiny", rope_theta=1.28e8), eos=[128001, 128009])
    sft = load_recipe("sft_cpu", [f"checkpoint.dir={tmp_path / 'sft'}", f"checkpoint.init_from={init}"])
    start = resolve_start(sft)
    assert start.kind == "weights"
    assert ModelRecordCallback.for_start(sft, start, log=lambda _: None).hf_extras.eos_token_id == [128001, 128009]

    # a start checkpoint written by Bridge without our record: only `model:` in run_config.yaml
    run_config = resolve_iter_dir(init) / "run_config.yaml"
    run_config.write_text("model:\n  num_layers: 2\n")
    logs = []
    callback = ModelRecordCallback.for_start(sft, start, log=logs.append)
    assert callback.hf_extras is None
    assert len(logs) == 1 and "records no bos/eos token ids" in logs[0] and "--ids-from" in logs[0]
    save, _, _ = bridge_save_checkpoint(bridge, bridge_callbacks, copy_weights_from(resolve_iter_dir(init)),
                                        {"model": {"num_layers": 2}})
    save(tmp_path / "sft", 2, [callback])
    arch, extras = read_recorded_config(tmp_path / "sft" / "iter_0000002")
    assert arch == sft.arch.replace(max_position_embeddings=4096) and extras is None
    with pytest.raises(ConversionError, match=r"iter_0000002/prolong_record.yaml: .*--ids-from HF_DIR"):
        megatron_to_hf(tmp_path / "sft", tmp_path / "hf", show_progress=False)
    # a save folder it cannot find (no tracker) is reported, not a crash of the training loop
    state = SimpleNamespace(cfg=SimpleNamespace(checkpoint=SimpleNamespace(save=str(tmp_path / "nowhere"))))
    callback.on_checkpoint_save(bridge_callbacks.CallbackContext(state=state, model=[]))
    assert "no saved checkpoint folder found" in logs[-1] and callback.recorded == [tmp_path / "sft" / "iter_0000002"]
