"""`prolong-nemo plan`: memory estimates checked against hand-computed Llama-3-8B numbers,
divisibility and version refusals with their reasons, and the command's exit codes."""

from __future__ import annotations

import json

import pytest

from prolong_nemo.cli import main as cli_main
from prolong_nemo.model.config import preset
from prolong_nemo.model.flops import GPU_PEAKS, MFU_BAND, flops_per_token, forward_flops_from_moments, step_cost
from prolong_nemo.recipes.config import ParallelConfig
from prolong_nemo.recipes.plan import (
    GB,
    cudnn_version_tuple,
    estimate_memory,
    layer_activation_bytes,
    make_plan,
    padded_vocab,
    params_per_gpu,
    parse_version,
    total_params,
)
from prolong_nemo.recipes.stages import load_recipe

L3 = preset("llama3-8b")
GOOD_ENV = {"megatron-core": "0.19.2", "megatron-bridge": "0.6.2", "transformer-engine": "2.16.0+abc",
            "cudnn": "9.10.1", "torch": "2.14.1"}


def test_llama3_8b_parameter_count_and_bf16_weights():
    # embed 128256*4096 twice (untied) + 32 layers * 218,112,000 + final norm 4096
    assert total_params(L3) == 2 * 525_336_576 + 32 * 218_112_000 + 4096 == 8_030_261_248
    m = estimate_memory(L3, ParallelConfig(distributed_optimizer=False, grad_reduce_in_fp32=False), 65536, dp=1)
    assert m.params == 8_030_261_248
    assert m.weights == 16_060_522_496  # 16.06 GB
    assert round(m.weights / GB, 2) == 16.06
    assert m.gradients == 16_060_522_496  # bf16 grad buffer
    assert m.optimizer == 12 * 8_030_261_248  # fp32 master + m + v, unsharded: 96.36 GB


def test_vocab_padding_per_tp():
    assert padded_vocab(128256, 1) == 128256 and padded_vocab(128256, 2) == 128256
    assert padded_vocab(128256, 4) == 128512 and padded_vocab(128256, 8) == 129024


def test_tensor_parallel_split():
    # norms (2 * 4096 per layer, final norm) are replicated; everything else is split in two
    assert params_per_gpu(L3, ParallelConfig(tp=2)) == 32 * (218_103_808 // 2 + 8192) + 2 * 262_668_288 + 4096
    assert params_per_gpu(L3, ParallelConfig(tp=2)) == 4_015_263_744
    # PP=2: the first stage holds the embedding, the last the output layer + final norm
    pp2 = params_per_gpu(L3, ParallelConfig(pp=2))
    assert pp2 == 16 * 218_112_000 + 525_336_576 + 4096


def test_distributed_optimizer_shards_over_dp_times_cp():
    par = ParallelConfig(tp=2, cp=4, sequence_parallel=True)
    m = estimate_memory(L3, par, 524288, dp=1)
    assert m.optimizer == 12 * 4_015_263_744 / 4  # DP1 x CP4
    m8 = estimate_memory(L3, ParallelConfig(tp=2, sequence_parallel=True), 65536, dp=4)
    assert m8.optimizer == 12 * 4_015_263_744 / 4 == 12_045_791_232
    assert m8.gradients == 4 * 4_015_263_744  # fp32 grad buffer (grad_reduce_in_fp32)


def test_logits_at_64k_tokens():
    m = estimate_memory(L3, ParallelConfig(), 65536, dp=8, loss_impl="fused")
    bf16, fp32 = 65536 * 128256 * 2, 65536 * 128256 * 4
    assert (round(bf16 / GB, 1), round(fp32 / GB, 1)) == (16.8, 33.6)
    assert m.logits_unchunked == bf16 + fp32 == m.logits
    assert m.logits_chunked == 2048 * 128256 * 6  # 1.58 GB with 2,048-token blocks
    chunked = estimate_memory(L3, ParallelConfig(), 65536, dp=8, loss_impl="chunked")
    assert chunked.logits == chunked.logits_chunked
    assert m.total - chunked.total == pytest.approx(bf16 + fp32 - 2048 * 128256 * 6)
    # CP and TP divide the local logits
    cp = estimate_memory(L3, ParallelConfig(tp=2, cp=4, sequence_parallel=True), 524288, dp=1, loss_impl="fused")
    assert cp.logits == 131072 * 64128 * 6


def test_activation_model():
    s, h = 65536, 4096
    # 34 bytes per token and hidden unit for Llama-3-8B (GQA 8/32, SwiGLU 3.5h)
    assert layer_activation_bytes(L3, s, 1, False) == 34 * s * h
    assert layer_activation_bytes(L3, s, 2, True) == 34 * s * h / 2
    assert layer_activation_bytes(L3, s, 2, False) == (8 + 26 / 2) * s * h
    m = estimate_memory(L3, ParallelConfig(tp=2, sequence_parallel=True), s, dp=4)
    assert m.activations == 32 * 2 * s * h / 2 + 34 * s * h / 2 == 13_153_337_344
    no_recompute = estimate_memory(L3, ParallelConfig(tp=2, sequence_parallel=True, recompute="none"), s, dp=4)
    assert no_recompute.activations == 32 * 34 * s * h / 2
    # PP2 with 1F1B: 16 layers per stage, 2 micro-batches of layer inputs in flight
    pp = estimate_memory(L3, ParallelConfig(tp=2, pp=2, sequence_parallel=True), s, dp=2, microbatches=32)
    assert pp.activations == 2 * 16 * 2 * s * h / 2 + 34 * s * h / 2


def test_default_recipes_fit_8x_h100_80gb():
    # 54,078,715,904 before the LM head's input, its gradient and the dummy weight gradient
    head_64k = 2 * 65536 * 4096 * 2 + 64128 * 4096 * 2
    for name, expected_total in (("stage_64k", 54_078_715_904 + head_64k), ("sft", 54_078_715_904 + head_64k)):
        plan = make_plan(load_recipe(name), env=GOOD_ENV, strict_env=True)
        assert plan.ok, plan.errors
        assert plan.memory.total == pytest.approx(expected_total)
    plan = make_plan(load_recipe("stage_512k"), env=GOOD_ENV, strict_env=True)
    assert plan.ok, plan.errors
    m = plan.memory
    assert m.activations == 32 * 2 * 131072 * 4096 / 2 + 34 * 131072 * 4096 / 2
    assert m.total == pytest.approx(2 * 4_015_263_744 + 4 * 4_015_263_744 + 12 * 4_015_263_744 / 4
                                    + m.activations + 2048 * 64128 * 6 + 4e9
                                    + 2 * 131072 * 4096 * 2 + 64128 * 4096 * 2)  # LM head input, grad, dummy
    assert m.total < 80 * GB


def test_layouts_that_do_not_fit_are_refused():
    plan = make_plan(load_recipe("stage_512k", ["parallel.tp=1", "parallel.cp=8", "parallel.sequence_parallel=false"]),
                     env=GOOD_ENV)
    assert not plan.ok and "exceeds 80 GB" in plan.errors[0]
    plan = make_plan(load_recipe("stage_64k", ["parallel.tp=1", "parallel.sequence_parallel=false"]), env=GOOD_ENV)
    assert not plan.ok and plan.memory.total > 80 * GB
    # the unchunked loss adds 25 GB of logits per GPU at TP2: 78.5 GB before the LM head's input,
    # its gradient and dummy weight gradient (1.6 GB) were counted, 80.1 GB with them: refused
    plan = make_plan(load_recipe("stage_64k", ["loss.impl=fused"]), env=GOOD_ENV)
    assert plan.memory.logits == 65536 * 64128 * 6
    assert plan.memory.total == 54_078_715_904 - 2048 * 64128 * 6 + 65536 * 64128 * 6 + 1_599_078_400
    assert not plan.ok and "exceeds 80 GB" in plan.errors[0]


def test_divisibility_refusals_skip_the_estimate():
    plan = make_plan(load_recipe("stage_512k", ["parallel.cp=3"], validate=False), env=GOOD_ENV)
    assert not plan.ok and plan.memory is None
    assert any("not divisible by 2*cp=6" in e for e in plan.errors)
    assert any("world size 8 not divisible by tp*pp*cp=6" in e for e in plan.errors)


@pytest.mark.parametrize("change, message", [
    ({"cudnn": "9.5.1"}, "cudnn 9.5.1 is older than 9.6.0"),
    ({"transformer-engine": "2.10.0"}, "transformer-engine 2.10.0 is older than 2.14"),
    ({"megatron-core": "0.16.0"}, "megatron-core 0.16.0 is older than 0.17"),
])
def test_old_versions_are_refused(change, message):
    plan = make_plan(load_recipe("stage_64k"), env=GOOD_ENV | change)
    assert not plan.ok and any(message in e for e in plan.errors), plan.errors


# NGC NeMo 26.06 (megatron-core 0.18, TE 2.16, Bridge 0.5.0), the Dockerfile's default base
# image, whose build runs `prolong-nemo plan stage_512k`.
NGC_26_06 = {"megatron-core": "0.18.0", "megatron-bridge": "0.5.0", "transformer-engine": "2.16.0",
             "torch": "2.10.0"}


NGC_26_04 = {"megatron-core": "0.17.0", "megatron-bridge": "0.4.0", "transformer-engine": "2.14.0",
             "torch": "2.10.0"}


@pytest.mark.parametrize("name", ["stage_64k", "stage_512k", "sft"])
def test_ngc_26_06_stack_passes_with_the_chunked_loss(name):
    # The chunked loss runs on every supported megatron-core: through GPTModel's output_processor
    # hook where forward has it (0.18 and later), else model.loss.chunked_loss_without_hook (0.17).
    recipe = load_recipe(name)
    assert recipe.loss.impl == "chunked"
    plan = make_plan(recipe, env=NGC_26_06 | {"cudnn": "9.10.1"}, strict_env=True)
    assert plan.ok, plan.errors
    no_gpu = make_plan(recipe, env=NGC_26_06)  # docker build: no GPU, so no cuDNN version
    assert no_gpu.ok and [w for w in no_gpu.warnings if "cudnn" in w], no_gpu.warnings


def test_stage_chaining_needs_bridge_0_5():
    assert make_plan(load_recipe("stage_64k"), env=GOOD_ENV | {"megatron-bridge": "0.4.0"}).ok
    plan = make_plan(load_recipe("stage_512k"), env=GOOD_ENV | {"megatron-bridge": "0.4.0"})
    assert any("megatron-bridge 0.4.0 is older than 0.5" in e for e in plan.errors)


def test_missing_packages_warn_here_and_fail_strict():
    env = {"megatron-core": "0.19.2"}
    plan = make_plan(load_recipe("stage_64k"), env=env)
    assert plan.ok and len(plan.warnings) == 3
    strict = make_plan(load_recipe("stage_64k"), env=env, strict_env=True)
    assert not strict.ok and len(strict.errors) == 3


def test_gqa_cudnn_requirement_only_on_hopper():
    plan = make_plan(load_recipe("stage_64k", ["cluster.gpu_arch=blackwell"]), env=GOOD_ENV | {"cudnn": "9.1.0"})
    assert plan.ok


def test_version_parsing():
    assert parse_version("2.16.0+cu13.abc") == (2, 16, 0)
    assert parse_version("0.19.0rc1") == (0, 19, 0)
    assert parse_version(None) is None
    assert cudnn_version_tuple(90600) == (9, 6, 0) and cudnn_version_tuple(91002) == (9, 10, 2)
    assert cudnn_version_tuple(8907) == (8, 9, 7)


def test_plan_command_exit_codes(capsys):
    assert cli_main(["plan", "stage_64k_cpu"]) == 0
    assert "plan OK" in capsys.readouterr().out
    assert cli_main(["plan", "stage_512k", "parallel.cp=3"]) == 1
    out = capsys.readouterr().out
    assert "REFUSED: sequence length 524288 not divisible by 2*cp=6" in out
    assert cli_main(["plan", "stage_64k", "--json", "--strict-env"]) == 1  # no TE on this machine
    data = json.loads(capsys.readouterr().out)
    assert data["memory_gb"]["weights"] == pytest.approx(8.030527488)
    assert any("transformer-engine" in e for e in data["errors"])
    assert cli_main(["plan", "stage_9k"]) == 2


@pytest.mark.parametrize("stack", [NGC_26_04, NGC_26_06], ids=["26.04", "26.06"])
def test_dockerfile_build_plan_passes_on_the_advertised_bases(stack):
    """The Dockerfile's build-time `prolong-nemo plan` must pass on both bases it advertises."""
    from pathlib import Path

    dockerfile = (Path(__file__).resolve().parents[1] / "Dockerfile").read_text()
    assert "nemo:26.06" in dockerfile and ":26.04" in dockerfile
    commands = [line.split("prolong-nemo plan", 1)[1].split() for line in dockerfile.splitlines()
                if "prolong-nemo plan" in line and not line.lstrip().startswith("#")]
    assert commands
    for args in commands:
        plan = make_plan(load_recipe(args[0], [a for a in args[1:] if not a.startswith("-")]), env=stack)
        assert plan.ok, (args, plan.errors)
    # chaining needs Bridge >= 0.5: on 26.04 the 512K stage is refused with that reason
    if stack is NGC_26_04:
        assert any("older than 0.5" in e for e in make_plan(load_recipe("stage_512k"), env=stack).errors)


# ---------------------------------------------------------------------------------------------
# The LM head's memory beyond the logits (defect: 1.6 GB at 64K and 2.7 GB at 512K were missing)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, local_tokens", [("stage_64k", 65536), ("stage_512k", 524288 // 4)])
def test_lm_head_terms_at_the_stage_layouts(name, local_tokens):
    recipe = load_recipe(name)
    assert (recipe.parallel.tp, recipe.parallel.sequence_parallel, recipe.loss.chunk_tokens) == (2, True, 2048)
    m = make_plan(recipe, env=GOOD_ENV).memory
    h, v_local, chunk = 4096, 128256 // 2, 2048
    # the head's input: the final norm output all-gathered over TP (sequence parallel), [T/cp, H]
    # bf16, saved for the backward; its gradient [T/cp, H] bf16 before the reduce-scatter
    assert m.head_input == local_tokens * h * 2 == {65536: 536_870_912, 131072: 1_073_741_824}[local_tokens]
    assert m.head_input_grad == local_tokens * h * 2
    # the uncached [V/tp, H] bf16 tensor handed to autograd when the gradient went into main_grad
    assert m.head_dummy_wgrad == v_local * h * 2 == 525_336_576
    # per chunk: the recomputed [chunk, V/tp] logits in fp32 and their bf16 copy
    assert m.logits_fp32 == chunk * v_local * 4 == 525_336_576
    assert m.logits_bf16 == chunk * v_local * 2 == 262_668_288
    assert m.logits == m.logits_fp32 + m.logits_bf16 == m.logits_chunked
    missing = m.head_input + m.head_input_grad + m.head_dummy_wgrad
    assert missing == {65536: 1_599_078_400, 131072: 2_672_820_224}[local_tokens]
    assert m.total == pytest.approx(m.weights + m.gradients + m.optimizer + m.activations + m.logits + missing
                                    + m.reserve)
    rows = dict(m.rows())
    assert rows["LM head input + its gradient (bf16)"] == 2 * local_tokens * h * 2
    assert rows["LM head dummy weight gradient (bf16)"] == v_local * h * 2


def test_lm_head_terms_without_sequence_parallel_and_fused():
    # no TP: the head's input is the final norm output itself, [T/cp, H], with all V rows
    m = estimate_memory(L3, ParallelConfig(), 65536, dp=8)
    assert m.head_input == m.head_input_grad == 65536 * 4096 * 2
    assert m.head_dummy_wgrad == 128256 * 4096 * 2
    fused = estimate_memory(L3, ParallelConfig(tp=2, sequence_parallel=True), 65536, dp=4, loss_impl="fused")
    assert (fused.logits_fp32, fused.logits_bf16) == (65536 * 64128 * 4, 65536 * 64128 * 2)
    assert fused.head_input == 65536 * 4096 * 2 and fused.head_dummy_wgrad == 64128 * 4096 * 2


# ---------------------------------------------------------------------------------------------
# Pipeline parallelism is refused (packed THD rows vary in length)
# ---------------------------------------------------------------------------------------------
def test_pipeline_parallel_is_refused_by_plan(capsys):
    plan = make_plan(load_recipe("stage_64k", ["parallel.pp=2"], validate=False), env=GOOD_ENV)
    assert not plan.ok and plan.memory is None
    assert [e for e in plan.errors if "parallel.pp" in e] == [plan.errors[0]]
    assert plan.errors[0].startswith("parallel.pp=2 is not supported: packed THD rows vary in length")
    assert cli_main(["plan", "stage_512k", "parallel.pp=2"]) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if "parallel.pp" in line]
    assert len(lines) == 1 and lines[0].strip().startswith("REFUSED: parallel.pp=2 is not supported")


# ---------------------------------------------------------------------------------------------
# Distributed-optimizer checkpoint format and its host memory
# ---------------------------------------------------------------------------------------------
def test_reshardable_checkpoint_host_memory_is_counted(capsys):
    plan = make_plan(load_recipe("stage_64k", ["checkpoint.optim_reshardable=true"]), env=GOOD_ENV)
    assert plan.ok, plan.errors
    c = plan.checkpoint
    # every rank gathers fp32 master + Adam m and v of all 4,015,263,744 parameters its TP rank
    # holds (all DP x CP shards) into CPU tensors, on every save and on every load
    assert c.reshardable and c.gather_bytes_per_rank == 12 * 4_015_263_744 == 48_183_164_928
    assert c.host_bytes_per_rank == 48_183_164_928
    assert c.host_bytes_per_node == 8 * 48_183_164_928 == 385_465_319_424
    report = plan.report()
    assert "48.18 GB per rank" in report and "385.47 GB per node" in report
    assert "fully reshardable" in report
    # the recipes' own chain needs none of it: DP-reshardable, nothing gathered
    default = make_plan(load_recipe("stage_64k"), env=GOOD_ENV)
    assert not default.checkpoint.reshardable and default.checkpoint.host_bytes_per_rank == 0
    assert default.checkpoint.host_bytes_per_node == 0
    assert default.checkpoint.gather_bytes_per_rank == 48_183_164_928  # what reshardable would cost
    assert "DP-reshardable" in default.report() and "385.47 GB per node" in default.report()
    # 512K at TP2 CP4: the same 4.0B parameters per rank
    s512 = make_plan(load_recipe("stage_512k", ["checkpoint.optim_reshardable=true"]), env=GOOD_ENV).checkpoint
    assert s512.host_bytes_per_rank == 48_183_164_928
    assert cli_main(["plan", "stage_64k", "checkpoint.optim_reshardable=true", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["checkpoint"]["reshardable"] is True
    assert data["checkpoint"]["host_gb_per_rank"] == pytest.approx(48.183164928)
    assert data["checkpoint"]["host_gb_per_node"] == pytest.approx(385.465319424)


def _bridge_checkpoint(root, *, tp: int, pp: int, reshardable: bool, iteration: int = 125):
    """The files `plan` reads from a Megatron-Bridge checkpoint root (tracker + run_config.yaml)."""
    import yaml

    folder = root / f"iter_{iteration:07d}"
    folder.mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
    (folder / "run_config.yaml").write_text(yaml.safe_dump({
        "model": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp},
        "optimizer": {"use_distributed_optimizer": True},
        "checkpoint": {"dist_ckpt_optim_fully_reshardable": reshardable, "save_optim": True},
    }))
    return root


def test_chained_stage_refuses_adam_state_it_cannot_load(tmp_path):
    prev = _bridge_checkpoint(tmp_path / "64k", tp=2, pp=1, reshardable=False)
    own = [f"checkpoint.init_from={prev}", f"checkpoint.dir={tmp_path / '512k'}"]
    assert make_plan(load_recipe("stage_512k", own), env=GOOD_ENV).ok  # TP2 -> TP2: DP-reshardable loads
    plan = make_plan(load_recipe("stage_512k", [*own, "parallel.tp=4", "parallel.cp=2"]), env=GOOD_ENV)
    assert not plan.ok
    [error] = [e for e in plan.errors if "optim_reshardable" in e]
    assert "saved at tp=2 pp=1" in error and "tp=4 pp=1" in error and str(prev) in error
    # saved fully reshardable: any layout loads
    prev2 = _bridge_checkpoint(tmp_path / "64k_r", tp=2, pp=1, reshardable=True)
    assert make_plan(load_recipe("stage_512k", [f"checkpoint.init_from={prev2}", f"checkpoint.dir={tmp_path / 'b'}",
                                                "parallel.tp=4", "parallel.cp=2"]), env=GOOD_ENV).ok
    # a weights-only start reads no optimizer state
    assert make_plan(load_recipe("sft", [f"checkpoint.init_from={prev}", f"checkpoint.dir={tmp_path / 's'}",
                                         "parallel.tp=4"]), env=GOOD_ENV).ok
    # a converted HF model records tp=1 and no optimizer state: nothing to check
    from prolong_nemo.convert.megatron_io import write_run_config, write_tracker

    converted = tmp_path / "converted" / "iter_0000000"
    converted.mkdir(parents=True)
    write_run_config(converted, preset("llama3-tiny"))
    write_tracker(converted.parent, 0)
    assert make_plan(load_recipe("stage_512k", [f"checkpoint.init_from={converted.parent}",
                                                f"checkpoint.dir={tmp_path / 'c'}"]), env=GOOD_ENV).ok


# ---------------------------------------------------------------------------------------------
# Which megatron-core has GPTModel's output_processor hook, and what the repository says
# ---------------------------------------------------------------------------------------------
def test_output_processor_hook_exists_from_megatron_core_0_18():
    import ast
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]

    def forward_args(folder: str) -> set[str]:
        path = repo / ".venv" / "extras" / folder / "megatron" / "core" / "models" / "gpt" / "gpt_model.py"
        if not path.is_file():
            pytest.skip(f"{path} not installed (scripts/setup.sh)")
        cls = next(n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef) and n.name == "GPTModel")
        fwd = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
        return {a.arg for a in fwd.args.args + fwd.args.kwonlyargs}

    assert "output_processor" in forward_args("mcore018")  # 0.18.2 (NGC 26.06 ships 0.18)
    assert "output_processor" not in forward_args("mcore017")  # 0.17.1 (NGC 26.04): the fallback
    near = re.compile(r"output_processor.{0,160}?0\.19|0\.19.{0,160}?output_processor", re.S)
    files = [p for d in ("prolong_nemo", "docs", "recipes", "bench", "converters") for p in (repo / d).rglob("*")
             if p.suffix in (".py", ".md", ".yaml")] + [repo / "README.md"]
    claims = [str(p.relative_to(repo)) for p in files if near.search(p.read_text())]
    assert not claims, f"these say output_processor needs megatron-core 0.19: {claims}"


def test_reshardable_format_with_padded_buckets_is_warned_about():
    # DP12 (3 nodes at TP2): bucket ends padded to lcm(12, 128) = 384 elements, not a divisor of
    # 4,096; megatron's fully reshardable save misaligns states after them
    over = ["cluster.nodes=3", "train.global_batch_size=48", "checkpoint.optim_reshardable=true"]
    plan = make_plan(load_recipe("stage_64k", over), env=GOOD_ENV)
    assert plan.ok and plan.recipe.data_parallel_size == 12
    [warning] = [w for w in plan.warnings if "bucket" in w]
    assert "DP x CP = 12" in warning and "384" in warning
    # power-of-two DP x CP, or the DP-reshardable format: nothing to warn about
    for overrides in (["checkpoint.optim_reshardable=true"], over[:2]):
        assert not [w for w in make_plan(load_recipe("stage_64k", overrides), env=GOOD_ENV).warnings if "bucket" in w]


# ---------------------------------------------------------------------------------------------
# Step time: model FLOPs from the mixture's document lengths, the MFU band, published figures
# ---------------------------------------------------------------------------------------------
# Megatron-Bridge performance summary, NeMo 25.11 container, DGX-H100 (docs/performance-summary.md,
# https://github.com/NVIDIA-NeMo/Megatron-Bridge/blob/main/docs/performance-summary.md; 25.09: 14,079
# and 725): LLAMA3_8B, 8 GPUs, FP8 current scaling, GBS 128, MBS 1, sequence 8192, no document
# masking. FP8: the table has no BF16 Llama-3-8B row on H100.
BRIDGE_LLAMA3_8B_H100_FP8 = {"seq_length": 8192, "tokens_per_s_per_gpu": 14451, "model_tflops_per_gpu": 744}
# ProLong (Gao et al. 2024, arXiv:2410.02660), the paper's training-cost table: the 64K stage (20B
# tokens) about 2.2K H100 hours, the 512K stage (20B tokens) about 12.2K. Their stack
# (github.com/princeton-nlp/ProLong train_64K.sh / train_512K.sh): Hugging Face Transformers +
# FSDP full sharding + gradient checkpointing + FlashAttention-2, Ulysses-style sequence
# parallelism over 8 GPUs at 512K.
PROLONG_H100_HOURS = {"stage_64k": 2200, "stage_512k": 12200}


@pytest.fixture
def no_data(tmp_path, monkeypatch):
    """The stages' data roots point at nothing: plan takes the default length distribution."""
    for stage in ("64K", "512K"):
        monkeypatch.setenv(f"PROLONG_DATA_{stage}", str(tmp_path / "absent"))


def test_plan_prints_the_step_cost_from_default_lengths(capsys, no_data):
    plan = make_plan(load_recipe("stage_64k"), env=GOOD_ENV)
    lengths, cost = plan.lengths, plan.cost
    assert lengths.source == "default" and "does not exist" in lengths.detail  # no data on this machine
    assert lengths.tokens == 65536
    per_sample = 3 * forward_flops_from_moments(L3, 65536, lengths.sum_sq).total
    assert cost.per_step.total == pytest.approx(64 * per_sample)
    assert cost.per_step.dominant == "dense" and cost.gpu.name == "H100-SXM" and cost.gpus == 8
    # full recompute runs the decoder layers' forward again; the chunked loss the LM head's
    f = forward_flops_from_moments(L3, 65536, lengths.sum_sq) * 64
    assert cost.hardware_per_step.total == pytest.approx(4 * f.total)
    fast, slow = cost.band()["gpu_hours"]
    assert fast == pytest.approx(cost.per_step.total * 5000 / (0.5 * 989.4e12) / 3600)
    assert slow == pytest.approx(fast * 0.5 / 0.3)
    report = plan.report()
    assert "step cost    model FLOPs per step" in report and "dense dominates" in report
    assert "30-50% MFU of H100-SXM bf16 dense peak 989 TFLOP/s" in report and "GPU-hours" in report
    # 512K: attention dominates, also in the JSON
    assert cli_main(["plan", "stage_512k", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["cost"]["dominant"] == "attention" and data["lengths"]["source"] == "default"
    assert data["cost"]["terms"]["attention"] > 2 * data["cost"]["terms"]["dense"]
    assert len(data["cost"]["gpu_hours"]) == 2 and data["cost"]["mfu_band"] == list(MFU_BAND)
    # a CPU recipe has no GPU to time
    assert make_plan(load_recipe("stage_64k_cpu"), env=GOOD_ENV).cost is None
    assert make_plan(load_recipe("stage_64k", ["cluster.gpu_memory_gb=141"]), env=GOOD_ENV).cost.gpu.name == "H200-SXM"


def test_plan_reads_the_lengths_from_the_data(tmp_path):
    from data_fixtures import write_random_domain

    long = write_random_domain(tmp_path / "long", 4, 8192, seed=3, max_docs=2)
    short = write_random_domain(tmp_path / "short", 4, 8192, seed=4, max_docs=30)
    over = [f"data.root={tmp_path}", "data.sequence_length=8192",
            "data.mixture=[{path:long,proportion:0.6},{path:short,proportion:0.4}]"]
    plan = make_plan(load_recipe("stage_64k", over), env=GOOD_ENV)
    assert plan.lengths.source == "data" and plan.lengths.samples_read == 8

    def mean_sum_sq(samples):
        return sum(float(sum((b - a) ** 2 for a, b in s["indices"] if b - a > 1)) for s in samples) / len(samples)

    assert plan.lengths.sum_sq == pytest.approx(0.6 * mean_sum_sq(long) + 0.4 * mean_sum_sq(short))
    assert "read 8 samples of 2 domains" in plan.report()


def test_bridge_published_llama3_8b_h100_throughput_is_in_the_band():
    pub = BRIDGE_LLAMA3_8B_H100_FP8
    s = pub["seq_length"]
    # the count reproduces Bridge's own model FLOPs from its tokens/s (51.47 GFLOP per token)
    assert flops_per_token(L3, s, s * s) * pub["tokens_per_s_per_gpu"] / 1e12 == pytest.approx(
        pub["model_tflops_per_gpu"], rel=2e-3)
    cost = step_cost(L3, tokens_per_sample=s, sum_sq_per_sample=s * s, samples_per_step=128, steps=1, gpus=8,
                     precision="fp8")
    low, high = cost.band()["tokens_per_s_per_gpu"]
    assert low < pub["tokens_per_s_per_gpu"] < high  # 37.6% of the FP8 dense peak
    # measured against the BF16 peak it would be 75% MFU: FP8 GEMMs, which the recipes do not use
    assert pub["model_tflops_per_gpu"] * 1e12 / GPU_PEAKS["H100-SXM"].bf16 > MFU_BAND[1]


@pytest.mark.parametrize("name, implied_mfu", [("stage_64k", (0.18, 0.21)), ("stage_512k", (0.06, 0.08))])
def test_prolong_published_stage_costs_against_the_band(name, implied_mfu, no_data):
    """ProLong's own runs come out below the Megatron band: the same model FLOPs (the recipes
    train ProLong's token counts, 5,000 x 64 x 64K and 2,500 x 16 x 512K) at 19.6% and 6.9% of
    the H100's BF16 peak. Their stack recomputes every layer (gradient checkpointing, +1/3 work
    on top of the model FLOPs), runs FlashAttention-2 (about 35% of the H100 peak by the
    FlashAttention-3 paper) on an attention-heavy mix, and at 512K adds Ulysses all-to-alls;
    the 512K figure stays 2.9x below the 64K one on the same stack, more than the attention
    share alone explains (see the issue 12 report). So the band is not widened to hold them."""
    recipe = load_recipe(name)
    plan = make_plan(recipe, env=GOOD_ENV)
    hours = PROLONG_H100_HOURS[name]
    mfu = plan.cost.per_step.total * recipe.train.steps / (hours * 3600 * GPU_PEAKS["H100-SXM"].bf16)
    assert implied_mfu[0] < mfu < implied_mfu[1] < MFU_BAND[0]
    assert hours > plan.cost.band()["gpu_hours"][1]


# ---------------------------------------------------------------------------------------------
# Hydra conventions: --cfg job and -m sweeps
# ---------------------------------------------------------------------------------------------
def test_cfg_job_prints_the_composed_recipe(capsys):
    import yaml

    from prolong_nemo.cli import main as cli_main
    from prolong_nemo.recipes.config import RecipeConfig

    assert cli_main(["plan", "stage_512k", "optim.lr=1e-5", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# recipe stage_512k, composed and resolved")
    printed = RecipeConfig.from_dict(yaml.safe_load(out))
    assert printed == load_recipe("stage_512k", ["optim.lr=1e-5"]) and printed.optim.lr == 1e-5
    assert out.rstrip().endswith("prolong-nemo train stage_512k --cfg job")


def test_multirun_sweep_prints_one_verdict_per_point(capsys):
    from prolong_nemo.cli import main as cli_main

    rc = cli_main(["plan", "-m", "stage_64k", "parallel.tp=2,4", "parallel.cp=range(1,3)", "train.seed=7"])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0, lines
    labels = [line.split(":")[0] for line in lines[:-1]]
    assert labels == [f"parallel.tp={tp} parallel.cp={cp} train.seed=7" for tp in (2, 4) for cp in (1, 2)]
    assert all(": OK | " in line and " GB/GPU of 80 | " in line for line in lines[:-1])
    assert lines[-1] == "4 of 4 points OK"
    # each point's verdict is that point's own plan
    for line, (tp, cp) in zip(lines, [(2, 1), (2, 2), (4, 1), (4, 2)]):
        point = make_plan(load_recipe("stage_64k", [f"parallel.tp={tp}", f"parallel.cp={cp}"]))
        assert f": OK | {point.memory.total / 1e9:.1f} GB/GPU of 80 | " in line
    assert len({line.split(" | ")[1] for line in lines[:-1]}) == 4  # four different layouts, four estimates
    rc = cli_main(["plan", "-m", "stage_64k", "parallel.tp=1,3"])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 1 and lines[-1] == "0 of 2 points OK"
    assert lines[1].startswith("parallel.tp=3: REFUSED: attention heads (32) not divisible by tp=3")
