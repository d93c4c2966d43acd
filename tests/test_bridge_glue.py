"""The Megatron-Bridge glue against the real megatron-bridge package (pinned below).

Bridge cannot be imported as a whole on a CPU machine: `megatron/bridge/__init__.py` imports
every model bridge, whose PEFT layers import Transformer Engine unconditionally, and
`training.config` / `training.pretrain` reach the same chain (plus nvidia-resiliency-ext,
whose PyPI release is older than megatron-core 0.19 accepts). So:
- modules that import without TE (`training.callbacks`, `data.base`) are imported for real,
  skipping only the package `__init__`s (empty package objects with the real `__path__`), and
  `prolong_nemo.recipes.bridge`'s dataset provider is built on the real `DatasetProvider`;
- the config classes Bridge builds on (megatron.training.config, megatron.core) are
  instantiated for real with our keyword arguments;
- Bridge-only fields and signatures are read from the installed Bridge source (AST).

Bridge is installed without dependencies into a side folder (never into the venv, where its
presence would make other tests try to import it):
    pip install --no-deps --target .venv/extras/bridge megatron-bridge==0.6.2
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import os
import re
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from prolong_nemo.model.config import preset
from prolong_nemo.recipes.bridge_spec import (
    TRAIN_STATE_COUNTERS,
    ProgressMeter,
    StartPoint,
    bridge_sections,
    build_prolong_datasets,
    dataset_fields,
    format_duration,
    model_flops_per_token,
    model_overrides,
    resolve_start,
    restart_schedule,
    schedule_of,
)
from prolong_nemo.recipes.config import RecipeError
from prolong_nemo.recipes.stages import load_recipe

REPO = Path(__file__).resolve().parents[1]
BRIDGE_VERSION = "0.6.2"  # the Megatron-Bridge release these tests pin
BRIDGE_SITE = Path(os.environ.get("PROLONG_BRIDGE_SITE", REPO / ".venv" / "extras" / "bridge"))


def bridge_source(relative: str) -> Path:
    path = BRIDGE_SITE / "megatron" / "bridge" / relative
    if not path.is_file():
        pytest.skip(f"megatron-bridge not installed in {BRIDGE_SITE} "
                    f"(pip install --no-deps --target {BRIDGE_SITE} megatron-bridge=={BRIDGE_VERSION})")
    return path


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


@pytest.fixture(scope="module")
def bridge_callbacks():
    """The real `megatron.bridge.training.callbacks`, imported without the package __init__."""
    bridge_source("training/callbacks.py")
    from importlib import metadata

    dist = metadata.PathDistribution(next(BRIDGE_SITE.glob("megatron_bridge-*.dist-info")))
    assert dist.version == BRIDGE_VERSION, f"tests pin megatron-bridge {BRIDGE_VERSION}, found {dist.version}"
    saved_path = list(sys.path)
    sys.path.insert(0, str(BRIDGE_SITE))
    package = types.ModuleType("megatron.bridge")
    package.__path__ = [str(BRIDGE_SITE / "megatron" / "bridge")]
    sys.modules["megatron.bridge"] = package
    try:
        yield importlib.import_module("megatron.bridge.training.callbacks")
    finally:
        for name in [m for m in sys.modules if m == "megatron.bridge" or m.startswith("megatron.bridge.")]:
            del sys.modules[name]
        for name in [m for m in sys.modules if m.startswith("prolong_nemo.recipes.bridge_callbacks")]:
            del sys.modules[name]
        sys.path[:] = saved_path


@pytest.fixture
def bridge_data():
    """The real `megatron.bridge.data.base` and our `prolong_nemo.recipes.bridge` on top of it.

    Only the package `__init__`s of `megatron.bridge` (model registry -> TE) and
    `megatron.bridge.data` (Hugging Face `datasets`) are skipped; everything is restored after.
    """
    bridge_source("data/base.py")

    def ours(name):
        return name == "megatron.bridge" or name.startswith(("megatron.bridge.", "prolong_nemo.recipes.bridge"))

    saved_modules = {k: v for k, v in sys.modules.items() if ours(k)}
    saved_path = list(sys.path)
    sys.path.insert(0, str(BRIDGE_SITE))
    for name in [m for m in sys.modules if ours(m)]:
        del sys.modules[name]
    for name, sub in (("megatron.bridge", ""), ("megatron.bridge.data", "data")):
        package = types.ModuleType(name)
        package.__path__ = [str(BRIDGE_SITE / "megatron" / "bridge" / sub)]
        sys.modules[name] = package
    try:
        yield importlib.import_module("megatron.bridge.data.base")
    finally:
        for name in [m for m in sys.modules if ours(m)]:
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
    assert ck.dist_ckpt_optim_fully_reshardable  # stage 2 reads stage 1's Adam state in another layout
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


def test_bridge_config_fields_exist_in_the_pinned_release():
    """Bridge-level fields (beyond the megatron base classes) checked against Bridge's source."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.training import config as mt

    config_py = bridge_source("training/config.py")
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
    used = set(re.findall(r"\bbc\.(\w+)", (REPO / "prolong_nemo/recipes/bridge.py").read_text()))
    assert {"ConfigContainer", "RNGConfig", "ValidationConfig", "TrainingConfig"} <= used <= module_names, \
        used - module_names
    tokenizer = dataclass_fields(bridge_source("training/tokenizers/config.py"), "TokenizerConfig")
    assert set(s["tokenizer"]) <= set(tokenizer) | base_fields(mt.TokenizerConfig)
    # bf16 mixed precision by name, as bridge.py asks for it
    assert "bf16_mixed" in {n.name for n in ast.walk(ast.parse(bridge_source("training/mixed_precision.py").read_text()))
                            if isinstance(n, ast.FunctionDef)}


def test_dataset_provider_contract():
    base_py = bridge_source("data/base.py")
    loader = dataclass_fields(base_py, "DataloaderConfig")
    context = dataclass_fields(base_py, "DatasetBuildContext")
    assert {"train_samples", "valid_samples", "test_samples"} <= set(context)
    ours = dataclass_fields(REPO / "prolong_nemo/recipes/bridge.py", "ProLongDatasetProvider")
    assert all(ours.values()), "provider fields need defaults (kw_only dataclass after Bridge's)"
    fields = dataset_fields(load_recipe("stage_512k"))
    assert set(fields) <= set(loader) | set(ours)
    assert fields["dataloader_type"] == "single"  # resume from consumed_train_samples
    assert set(ours) <= set(inspect.signature(build_prolong_datasets).parameters)
    # Bridge's protocol adapter calls build_datasets(context) for DatasetProvider instances
    utils = (bridge_source("data/utils.py")).read_text()
    assert "config.build_datasets(context)" in utils and "isinstance(dataset_config, DatasetProvider)" in utils
    # and its loader uses a dataset's collate_fn attribute when there is one
    assert 'collate_fn=train_ds.collate_fn if hasattr(train_ds, "collate_fn")' in bridge_source("data/loaders.py").read_text()


def test_pretrain_and_forward_step_signatures():
    assert function_params(bridge_source("training/pretrain.py"), "pretrain") == \
        ["config", "forward_step_func", "callbacks"]
    from prolong_nemo.training.forward_step import StepOptions, make_forward_step

    step = make_forward_step(StepOptions(partition_for_cp=True))
    assert list(inspect.signature(step).parameters) == ["data_iterator", "model"]
    # Bridge's TrainState counters are the ones the chaining callback resets
    state = dataclass_fields(bridge_source("training/state.py"), "TrainState")
    assert set(TRAIN_STATE_COUNTERS) <= set(state)
    assert {k for k in state if k not in TRAIN_STATE_COUNTERS} == {"do_train", "do_valid", "do_test"}
    # the entry script is valid Python and calls bridge.main
    entry = (REPO / "recipes/bridge_entry.py").read_text()
    compile(entry, "bridge_entry.py", "exec")
    assert "from prolong_nemo.recipes.bridge import main" in entry
    compile((REPO / "prolong_nemo/recipes/bridge.py").read_text(), "bridge.py", "exec")


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


def test_bridge_scheduler_counts_samples():
    """Why the chaining schedule is in samples: Bridge sizes and advances its scheduler that way."""
    config = bridge_source("training/config.py").read_text()
    assert "self.scheduler.lr_decay_steps = self.scheduler.lr_decay_iters * self.train.global_batch_size" in config
    assert "self.scheduler.lr_warmup_steps = self.scheduler.lr_warmup_iters * self.train.global_batch_size" in config
    train = bridge_source("training/train.py").read_text()
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
    from prolong_nemo.recipes.bridge_callbacks import StageChainCallback

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
    from prolong_nemo.recipes.bridge_callbacks import StageChainCallback

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
    from prolong_nemo.recipes.bridge_callbacks import ProgressLogCallback

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
    attention = 32 * 4 * 4096 * 32768  # causal: s/2 positions on average at 64K
    assert model_flops_per_token(l3, 65536) == 3 * (2 * matmul + attention) == 96_567_558_144
    meter = ProgressMeter.for_recipe(load_recipe("stage_64k"))
    assert meter.flops_per_step == 96_567_558_144 * 4_194_304 and meter.world_size == 8


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
    from prolong_nemo.recipes.bridge import ProLongDatasetProvider

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


def test_callbacks_for_a_chained_stage(bridge_data):
    """bridge.py's wiring: the chain callback gets this stage's schedule in Bridge's units."""
    from prolong_nemo.recipes.bridge import bridge_version, callbacks_for
    from prolong_nemo.recipes.bridge_callbacks import ProgressLogCallback, StageChainCallback

    assert bridge_version() == (0, 6, 2)
    recipe = load_recipe("stage_512k")
    chain, progress = callbacks_for(recipe, StartPoint("chain", load="/runs/64k"), log=lambda _: None)
    assert isinstance(chain, StageChainCallback) and isinstance(progress, ProgressLogCallback)
    assert chain.init_from == "/runs/64k"
    assert chain.schedule == dict(max_lr=5e-6, min_lr=pytest.approx(5e-7), warmup_steps=250 * 16,
                                  decay_steps=2500 * 16)  # samples: iterations x global batch 16
    resume = callbacks_for(recipe, StartPoint("resume", load="/runs/512k"), log=lambda _: None)
    assert [type(c) for c in resume] == [ProgressLogCallback]
