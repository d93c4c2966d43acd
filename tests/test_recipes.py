"""The ProLong recipes: exact hyperparameters (ProLong's train_64K.sh / train_512K.sh), Hydra overrides,
validation, and the CPU miniatures."""

from __future__ import annotations

import math

import pytest

from prolong_nemo.model.config import ROPE_THETA_64K, ROPE_THETA_512K
from prolong_nemo.recipes.config import RecipeConfig, RecipeError
from prolong_nemo.recipes.stages import (
    CPU_RECIPES,
    STAGE_RECIPES,
    available_recipes,
    compose_recipe,
    load_recipe,
    sft,
    stage_64k,
    stage_512k,
)

SHORT_MIX = {"fineweb-edu": 0.10, "fineweb-2023-50": 0.10, "stackexchange": 0.04, "dolmawiki": 0.04,
             "tuluv2": 0.03, "arxiv": 0.03, "openwebmath": 0.03, "textbooks": 0.03}


def mixture(recipe: RecipeConfig) -> dict[str, float]:
    return {d.path: d.proportion for d in recipe.data.mixture}


def common_optimizer(recipe: RecipeConfig) -> None:
    o = recipe.optim
    assert (o.adam_beta1, o.adam_beta2, o.adam_eps) == (0.9, 0.95, 1e-8)
    assert o.weight_decay == 0.1 and o.clip_grad == 1.0 and o.min_lr_ratio == 0.1
    assert recipe.train.micro_batch_size == 1
    assert recipe.loss.per_token and recipe.loss.impl == "chunked" and recipe.loss.chunk_tokens == 2048
    assert recipe.parallel.recompute == "full" and recipe.parallel.recompute_num_layers == 1
    assert recipe.parallel.distributed_optimizer
    assert recipe.data.document_masking
    assert recipe.model.preset == "llama3-8b"


def test_stage_64k_hyperparameters():
    r = stage_64k()
    common_optimizer(r)
    assert r.stage == "64k"
    assert r.data.sequence_length == 65536
    assert r.train.global_batch_size == 64 and r.train.steps == 5000
    assert r.tokens_per_step == 4_194_304  # 4M tokens
    assert r.total_tokens == 20_971_520_000  # about 20B
    assert r.optim.lr == 1e-5 and r.optim.min_lr == pytest.approx(1e-6)
    assert r.warmup_steps == 500
    assert r.model.rope_theta == ROPE_THETA_64K == 8e6
    assert r.arch.rope_theta == 8e6
    assert mixture(r) == {"thestackv1_concat_by_repo-65536": 0.30, "book-65536": 0.30, **SHORT_MIX}
    assert not r.data.instruction_masks
    assert r.checkpoint.save_interval == 125
    assert r.checkpoint.init == "weights"  # the converted HF Llama-3-8B-Instruct
    assert (r.parallel.tp, r.parallel.cp, r.parallel.pp, r.data_parallel_size) == (2, 1, 1, 4)
    assert r.grad_accumulation == 16


def test_stage_512k_hyperparameters():
    r = stage_512k()
    common_optimizer(r)
    assert r.data.sequence_length == 524288
    assert r.train.global_batch_size == 16 and r.train.steps == 2500
    assert r.tokens_per_step == 8_388_608 and r.total_tokens == 20_971_520_000
    # The released script's LR is the default; the paper's 1e-5 is an override away.
    assert r.optim.lr == 5e-6 and r.optim.min_lr == pytest.approx(5e-7)
    assert r.warmup_steps == 250
    assert r.model.rope_theta == ROPE_THETA_512K == 1.28e8
    assert mixture(r) == {"thestackv1_concat_by_repo-524288": 0.15, "thestackv1_concat_by_repo-65536": 0.15,
                          "book-524288": 0.05, "book-65536": 0.25, **SHORT_MIX}
    assert sum(mixture(r).values()) == pytest.approx(1.0)
    # Long domains are 60% of the mix, short ones 40% (the paper's ablation).
    long = sum(v for k, v in mixture(r).items() if k.startswith(("thestack", "book")))
    assert long == pytest.approx(0.6)
    assert r.checkpoint.init == "weights_and_optimizer"
    assert r.checkpoint.init_from == stage_64k().checkpoint.dir  # chained to stage 1 by default
    assert r.parallel.cp > 1 and r.parallel.cp * r.parallel.tp == 8


def test_stage_512k_paper_lr_override():
    r = stage_512k(["optim.lr=1e-5"])
    assert r.optim.lr == 1e-5 and r.optim.min_lr == pytest.approx(1e-6)


def test_sft_hyperparameters():
    r = sft()
    common_optimizer(r)
    assert r.data.sequence_length == 65536
    assert r.train.global_batch_size == 64 and r.train.steps == 250
    assert r.total_tokens == 1_048_576_000
    assert r.optim.lr == 2e-5 and r.optim.min_lr == pytest.approx(2e-6)
    assert r.warmup_steps == 13  # 5% of 250 rounded up, as in the reference
    assert r.model.rope_theta == 1.28e8
    assert r.data.instruction_masks
    assert mixture(r) == {"prolong-ultrachat-64K": 1.0}
    assert r.checkpoint.init == "weights" and r.checkpoint.init_from == stage_512k().checkpoint.dir
    assert r.checkpoint.save_interval == 250


def test_hydra_overrides_apply_and_interpolate(monkeypatch, tmp_path):
    monkeypatch.setenv("PROLONG_RUNS", str(tmp_path))
    r = load_recipe("stage_64k", ["train.steps=10", "parallel.tp=4", "name=my_64k", "cluster.nodes=2",
                                  "optim.warmup_fraction=0.2", "data.mixture=[{path: a, proportion: 1.0}]"])
    assert r.train.steps == 10 and r.warmup_steps == 2
    assert r.parallel.tp == 4 and r.cluster.world_size == 16 and r.data_parallel_size == 4
    assert r.name == "my_64k"
    assert r.checkpoint.dir == f"{tmp_path}/my_64k/checkpoints"  # ${oc.env:PROLONG_RUNS} / ${name}
    assert [(d.path, d.proportion) for d in r.data.mixture] == [("a", 1.0)]
    assert r.data.domain_paths() == [(f"{r.data.root}/a", 1.0)]


def test_unknown_override_key_is_refused():
    with pytest.raises(RecipeError, match="optim"):
        load_recipe("stage_64k", ["optim.learning_rate=1e-4"])
    with pytest.raises(RecipeError, match="unknown recipe"):
        load_recipe("stage_1m")


@pytest.mark.parametrize("overrides, message", [
    (["parallel.cp=3"], "not divisible by 2\\*cp=6"),
    (["parallel.tp=3"], "heads \\(32\\) not divisible by tp=3"),
    (["parallel.tp=16", "cluster.gpus_per_node=16"], "KV groups \\(8\\) not divisible by tp=16"),
    (["parallel.pp=3"], "layers \\(32\\) not divisible by pp=3"),
    (["train.global_batch_size=10"], "global batch 10 not divisible"),
    (["train.micro_batch_size=2"], "micro_batch_size must be 1"),
    (["optim.warmup_fraction=1.0"], "warmup_fraction"),
    (["data.mixture=[{path: a, proportion: 0.5}]"], r"data.mixture proportions sum to 0.5, not 1 \(a=0.5\)"),
    # the rule `data inspect` applies too (data/mixture.py): two spellings of one folder
    (["data.mixture=[{path: a, proportion: 0.5}, {path: ./a, proportion: 0.5}]"], "same domain folder"),
    (["parallel.sequence_parallel=true", "parallel.tp=1"], "needs tp > 1"),
    (["checkpoint.init=weights", "checkpoint.init_from=null"], "needs checkpoint.init_from"),
    (["loss.impl=naive"], "loss.impl"),
])
def test_validation_refuses_with_reason(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe("stage_64k", overrides)
    assert load_recipe("stage_64k", overrides, validate=False).problems()


def test_sft_requires_instruction_masks():
    with pytest.raises(RecipeError, match="instruction_masks"):
        load_recipe("sft", ["data.instruction_masks=false"])


def test_sequence_parallel_needs_cp_chunks_divisible_by_tp():
    r = load_recipe("stage_64k", ["data.sequence_length=65537"], validate=False)  # tp=2 with SP, cp=1
    assert r.problems() == ["sequence length / cp = 65537 not divisible by tp=2 (sequence parallel)"]
    r = load_recipe("stage_512k", ["data.sequence_length=524300"], validate=False)  # cp=4: needs % 8
    assert r.problems() == ["sequence length 524300 not divisible by 2*cp=8 (TE's load-balanced THD context "
                            "parallelism splits every sequence into 2*cp chunks)",
                            "sequence length / cp = 131075 not divisible by tp=2 (sequence parallel)"]


@pytest.mark.parametrize("stage", STAGE_RECIPES)
def test_cpu_miniature_keeps_the_stage_shape(stage):
    big, small = load_recipe(stage), load_recipe(CPU_RECIPES[stage])
    assert small.stage == big.stage and small.name == CPU_RECIPES[stage]
    assert small.model.preset == "llama3-tiny" and small.model.rope_theta == big.model.rope_theta
    assert small.optim == big.optim  # same LR, warmup fraction, betas, decay, clipping
    assert small.loss == big.loss
    # stage 1's miniature starts from random weights (no converted HF checkpoint of the tiny model)
    assert small.checkpoint.init == ("none" if stage == "stage_64k" else big.checkpoint.init)
    assert small.data.instruction_masks == big.data.instruction_masks
    assert small.parallel.model_parallel == 1 and small.cluster.world_size == 1
    assert small.train.steps <= 8 and small.data.sequence_length <= 4096
    if big.checkpoint.init_from and stage != "stage_64k":
        previous = {"stage_512k": "stage_64k_cpu", "sft": "stage_512k_cpu"}[stage]
        assert small.checkpoint.init_from == load_recipe(previous).checkpoint.dir
    # the miniature's Adam state is read by the next miniature, not by the full-size stage
    reader = big.checkpoint.optim_read_by
    assert small.checkpoint.optim_read_by == (CPU_RECIPES[reader] if reader else None)


def test_512k_cpu_is_eight_times_longer():
    assert load_recipe("stage_512k_cpu").data.sequence_length == 8 * load_recipe("stage_64k_cpu").data.sequence_length


def test_round_trip_and_listing():
    names = available_recipes()
    assert {"stage_64k", "stage_512k", "sft", "stage_64k_cpu", "stage_512k_cpu", "sft_cpu"} <= set(names)
    r = stage_512k()
    assert RecipeConfig.from_dict(r.to_dict()) == r
    raw = compose_recipe("stage_64k")
    with pytest.raises(RecipeError, match=r"^invalid recipe: extra: Key 'extra' not in 'RecipeConfig'$"):
        RecipeConfig.from_dict({**raw, "extra": {}})


def test_warmup_rounding():
    r = stage_64k()
    assert r.optim.warmup_steps(250) == 25
    assert sft().optim.warmup_steps(250) == math.ceil(12.5)
    assert sft().optim.warmup_steps(100) == 5  # exact products are not rounded up


def test_recipe_yaml_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text((load_recipe.__globals__["recipes_dir"]() / "stage_64k_cpu.yaml").read_text()
                    .replace("  - stage_64k\n", "").replace("name: stage_64k_cpu", "name: mine"))
    # a standalone file without the defaults list lacks the common keys
    with pytest.raises(RecipeError):
        load_recipe(str(path))


def test_recipe_errors_are_user_errors(capsys):
    """The CLI prints a bad recipe's reason without a traceback (exit code 2), for every command."""
    from prolong_nemo.cli import main as cli_main
    from prolong_nemo.errors import UserError

    assert issubclass(RecipeError, UserError)
    assert cli_main(["train", "stage_9k"]) == 2  # train_recipe does not catch RecipeError itself
    err = capsys.readouterr().err
    assert err.startswith("error: unknown recipe 'stage_9k'") and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# Pipeline parallelism: refused (packed THD rows vary in length)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["stage_64k", "stage_512k", "sft"])
def test_pipeline_parallel_is_refused_with_its_reason(name):
    problems = load_recipe(name, ["parallel.pp=2"], validate=False).problems()
    pp = [p for p in problems if "parallel.pp" in p]
    assert len(pp) == 1 and "\n" not in pp[0], problems
    assert pp[0].startswith("parallel.pp=2 is not supported") and "vary in length" in pp[0]
    assert "variable_seq_lengths" in pp[0] and "parallel.pp=1" in pp[0]
    with pytest.raises(RecipeError, match="parallel.pp=2 is not supported"):
        load_recipe(name, ["parallel.pp=2"])


# ---------------------------------------------------------------------------------------------
# Distributed-optimizer checkpoint format (checkpoint.optim_reshardable)
# ---------------------------------------------------------------------------------------------
def test_optimizer_checkpoint_format_follows_the_stage_chain():
    from prolong_nemo.recipes.config import optim_checkpoint_format

    s64, s512 = stage_64k(), stage_512k()
    assert s64.checkpoint.optim_reshardable == "auto" and s512.checkpoint.optim_reshardable == "auto"
    # 64K's Adam state is read by 512K (init=weights_and_optimizer); nobody reads 512K's or SFT's
    # but their own resumes (SFT takes 512K's weights only)
    assert s64.checkpoint.optim_read_by == "stage_512k"
    assert s512.checkpoint.optim_read_by is None and sft().checkpoint.optim_read_by is None
    # 64K TP2 DP4 -> 512K TP2 CP4 DP1: same tp, pp and DDP buckets (the optimizer shards over
    # DP x CP), so megatron's cheap DP-reshardable format loads: no full gather on every save
    f = optim_checkpoint_format(s64)
    assert not f.reshardable and "stage_512k" in f.reason and "tp=2 pp=1" in f.reason
    assert not optim_checkpoint_format(s512).reshardable and not optim_checkpoint_format(sft()).reshardable
    # a layout the DP-reshardable format cannot follow: another tp, or buckets of another size
    assert optim_checkpoint_format(stage_64k(["parallel.tp=4"])).reshardable
    assert optim_checkpoint_format(s64, reader=stage_512k(["parallel.tp=4", "parallel.cp=2"])).reshardable
    big = stage_64k(["cluster.nodes=16"])  # DP64: megatron's default bucket grows to 64M elements
    assert big.data_parallel_size == 64
    assert optim_checkpoint_format(big).reshardable and "bucket" in optim_checkpoint_format(big).reason
    # explicit settings win over the chain
    assert optim_checkpoint_format(stage_64k(["checkpoint.optim_reshardable=true"])).reshardable
    assert optim_checkpoint_format(stage_512k(["checkpoint.optim_reshardable=true"])).reshardable
    assert not optim_checkpoint_format(stage_64k(["parallel.tp=4", "checkpoint.optim_reshardable=false"])).reshardable


def test_optimizer_checkpoint_format_reaches_bridge():
    from prolong_nemo.training.bridge.sections import bridge_sections
    from prolong_nemo.training.start import StartPoint

    fresh = StartPoint("fresh", load="/runs/x")
    assert bridge_sections(stage_64k(), fresh)["checkpoint"]["dist_ckpt_optim_fully_reshardable"] is False
    assert bridge_sections(stage_64k(["parallel.tp=4"]), fresh)["checkpoint"]["dist_ckpt_optim_fully_reshardable"] is True
    on = bridge_sections(stage_512k(["checkpoint.optim_reshardable=true"]), fresh)["checkpoint"]
    assert on["dist_ckpt_optim_fully_reshardable"] is True


@pytest.mark.parametrize("overrides, message", [
    (["checkpoint.optim_reshardable=maybe"], "checkpoint.optim_reshardable must be auto, true or false"),
    (["checkpoint.optim_read_by=stage_64k"], "checkpoint.optim_read_by names this recipe"),
])
def test_optimizer_checkpoint_settings_are_validated(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe("stage_64k", overrides)


def test_optimizer_read_by_an_unknown_recipe_is_an_error():
    from prolong_nemo.recipes.config import optim_checkpoint_format

    with pytest.raises(RecipeError, match="checkpoint.optim_read_by='stage_2m'"):
        optim_checkpoint_format(stage_64k(["checkpoint.optim_read_by=stage_2m"]))


def test_recipes_describe_and_import_nothing_from_training():
    """`recipes/` describes a run, `training/` runs it: no import goes back up."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "prolong_nemo" / "recipes"
    found = {(path.name, node.module) for path in root.glob("*.py") for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prolong_nemo.training")}
    found |= {(path.name, alias.name) for path in root.glob("*.py") for node in ast.walk(ast.parse(path.read_text()))
              if isinstance(node, ast.Import) for alias in node.names if alias.name.startswith("prolong_nemo.training")}
    assert not found
    # and no backend code lives here (it moved to training/bridge and training/cpu)
    assert not [p.name for p in root.glob("*.py") if p.name.startswith(("bridge", "entry", "cpu"))]


@pytest.mark.parametrize("override, message", [
    ("parallel.tp=two", "parallel.tp: Value 'two' of type 'str' could not be converted to Integer"),
    ("optim.lr=abc", "optim.lr: Value 'abc' of type 'str' could not be converted to Float"),
    ("train.steps=100.5", "train.steps: Value '100.5' of type 'float' could not be converted to Integer"),
    ("parallel.sequence_parallel=maybe", "parallel.sequence_parallel: Value 'maybe' is not a valid bool"),
    ("model.preset=llama3-70b", "model.preset: unknown model preset 'llama3-70b'"),
    ("parallel.tpp=2", "parallel.tpp: Key 'tpp' not in 'ParallelConfig'"),
    ("+parallel.tpp=2", "parallel.tpp: Key 'tpp' not in 'ParallelConfig'"),
    ("data.mixture=[{path: a, proportion: x}]", "data.mixture: proportion: Value 'x' of type 'str' could not"),
    ("train.steps=null", "train.steps: field 'train.steps' is not Optional"),
])
def test_bad_values_are_one_line_naming_the_key(override, message, capsys):
    """The structured schema types every key: a bad value is refused by OmegaConf while composing,
    in one line naming the key, by every command that reads recipes."""
    from prolong_nemo.cli import main as cli_main

    with pytest.raises(RecipeError) as e:
        load_recipe("stage_64k", [override])
    assert str(e.value).startswith(f"recipe 'stage_64k': {message}") and "\n" not in str(e.value)
    for command in (["plan"], ["train", "--backend", "cpu"], ["launch", "--dry-run"]):
        capsys.readouterr()
        rc = cli_main([*command, "stage_64k", override])
        out = capsys.readouterr()
        text = (out.err + out.out).strip()
        assert rc in (1, 2) and message in text and "Traceback" not in text, (command, text)


def test_typed_values_are_the_dataclasses():
    r = load_recipe("stage_64k", ["parallel.tp=4", "optim.lr=2e-5", "+cluster.env.NCCL_DEBUG=INFO",
                                  "checkpoint.optim_reshardable=true"])
    assert type(r.parallel.tp) is int and r.parallel.tp == 4 and r.optim.lr == 2e-5
    assert r.cluster.env == {"NCCL_DEBUG": "INFO"} and r.checkpoint.optim_reshardable is True
    assert all(type(d).__name__ == "DomainConfig" for d in r.data.mixture)


def test_a_full_size_recipe_is_never_silently_swapped_for_its_cpu_miniature(monkeypatch, capsys):
    """`train stage_64k` where the Bridge backend cannot run (no GPU, or a container without
    Bridge) refuses in one line naming the miniature and --backend cpu, and trains nothing."""
    from prolong_nemo.cli import main as cli_main
    from prolong_nemo.training import train

    monkeypatch.setattr(train, "bridge_unavailable", lambda: "no CUDA device is visible")
    monkeypatch.setattr(train, "BACKENDS", {"cpu": "refused.before.import", "bridge": "refused.before.import"})
    assert cli_main(["train", "stage_64k", "optim.lr=2e-5"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: stage_64k is a full-size recipe and the Megatron-Bridge backend cannot run here (no CUDA "
                   "device is visible); to train its CPU miniature ask for it: `prolong-nemo train stage_64k_cpu` "
                   "or `prolong-nemo train stage_64k --backend cpu`\n")
    # a CPU recipe, or a YAML path, is what it says: no refusal (it fails later on the missing module)
    with pytest.raises(ModuleNotFoundError, match="refused"):
        train.train_recipe("stage_64k_cpu", [], log=lambda _: None)
