"""`prolong-nemo plan`: memory estimates checked against hand-computed Llama-3-8B numbers,
divisibility and version refusals with their reasons, and the command's exit codes."""

from __future__ import annotations

import json

import pytest

from prolong_nemo.cli import main as cli_main
from prolong_nemo.model.config import preset
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
    for name, expected_total in (("stage_64k", 54_078_715_904), ("sft", 54_078_715_904)):
        plan = make_plan(load_recipe(name), env=GOOD_ENV, strict_env=True)
        assert plan.ok, plan.errors
        assert plan.memory.total == pytest.approx(expected_total)
    plan = make_plan(load_recipe("stage_512k"), env=GOOD_ENV, strict_env=True)
    assert plan.ok, plan.errors
    m = plan.memory
    assert m.activations == 32 * 2 * 131072 * 4096 / 2 + 34 * 131072 * 4096 / 2
    assert m.total == pytest.approx(2 * 4_015_263_744 + 4 * 4_015_263_744 + 12 * 4_015_263_744 / 4
                                    + m.activations + 2048 * 64128 * 6 + 4e9)
    assert m.total < 80 * GB


def test_layouts_that_do_not_fit_are_refused():
    plan = make_plan(load_recipe("stage_512k", ["parallel.tp=1", "parallel.cp=8", "parallel.sequence_parallel=false"]),
                     env=GOOD_ENV)
    assert not plan.ok and "exceeds 80 GB" in plan.errors[0]
    plan = make_plan(load_recipe("stage_64k", ["parallel.tp=1", "parallel.sequence_parallel=false"]), env=GOOD_ENV)
    assert not plan.ok and plan.memory.total > 80 * GB
    # the unchunked loss adds 25 GB of logits per GPU at TP2: still fits, by a little
    plan = make_plan(load_recipe("stage_64k", ["loss.impl=fused"]), env=GOOD_ENV)
    assert plan.ok and plan.memory.logits == 65536 * 64128 * 6


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
    # megatron-core 0.18 has no GPTModel output_processor hook: the forward step falls back to
    # model.loss.chunked_loss_without_hook, so the chunked loss must not demand 0.19.
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
