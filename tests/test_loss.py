"""Chunked LM head + cross-entropy vs the full path; vocab-parallel; per-token averaging."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from prolong_nemo.model.cross_entropy import (
    VocabShard,
    chunked_linear_cross_entropy,
    full_linear_cross_entropy,
)
from prolong_nemo.model.loss import masked_token_loss


def _inputs(n=300, h=32, v=1000, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * 2).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, labels


def _loss_and_grads(fn, hidden, weight, labels, grad_out):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, labels)
    loss.backward(grad_out)
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("chunk", [1, 64, 77, 300, 4096])
def test_chunked_equals_full_cross_entropy(chunk):
    hidden, weight, labels = _inputs()
    # a non-uniform upstream gradient (like a loss mask / token weights)
    grad_out = torch.rand(labels.shape, generator=torch.Generator().manual_seed(1))
    full = _loss_and_grads(full_linear_cross_entropy, hidden, weight, labels, grad_out)
    chunked = _loss_and_grads(
        lambda h, w, y: chunked_linear_cross_entropy(h, w, y, chunk_tokens=chunk), hidden, weight, labels, grad_out
    )
    rel = ((chunked[0].sum() - full[0].sum()).abs() / full[0].sum().abs()).item()
    assert rel <= 1e-6, rel
    assert (chunked[0] - full[0]).abs().max().item() <= 1e-5 * full[0].abs().max().item()
    assert (chunked[1] - full[1]).abs().max().item() <= 1e-5
    assert (chunked[2] - full[2]).abs().max().item() <= 1e-5
    assert full[2].abs().max() > 1e-2  # gradients are not trivially tiny


def test_chunked_matches_float64_reference():
    """Independent reference: log-softmax in float64."""
    hidden, weight, labels = _inputs(n=50, v=300, seed=3)
    ours = chunked_linear_cross_entropy(hidden, weight, labels, chunk_tokens=16).detach().double()
    logits = hidden.detach().double() @ weight.detach().double().t()
    ref = -torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_chunked_bf16_close_to_fp32():
    hidden, weight, labels = _inputs(n=128, v=500, seed=4)
    ref = full_linear_cross_entropy(hidden, weight, labels)
    ref.sum().backward()
    h16, w16 = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    ours = chunked_linear_cross_entropy(h16, w16, labels, chunk_tokens=32)
    ours.sum().backward()
    assert ours.dtype == torch.float32 and h16.grad.dtype == torch.bfloat16 and w16.grad.dtype == torch.bfloat16
    assert ((ours.detach() - ref.detach()).abs().max() / ref.abs().max()).item() < 2e-2
    for ours_g, ref_g in ((h16.grad, hidden.grad), (w16.grad, weight.grad)):
        assert ((ours_g.float() - ref_g).abs().max() / ref_g.abs().max()).item() < 3e-2


# ---- vocabulary parallel (TP = 2 over gloo) ------------------------------------------------


def _tp_worker(rank: int, world: int, port: int, out_path: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    hidden, weight, labels = _inputs(n=90, v=1000, seed=7)
    rows = weight.size(0) // world
    w_local = weight.detach()[rank * rows : (rank + 1) * rows].clone().requires_grad_()
    h = hidden.detach().clone().requires_grad_()
    shard = VocabShard(start=rank * rows, group=dist.group.WORLD)
    loss = chunked_linear_cross_entropy(h, w_local, labels, chunk_tokens=25, shard=shard)
    loss.sum().backward()
    torch.save({"loss": loss.detach(), "grad_h": h.grad, "grad_w": w_local.grad}, f"{out_path}.{rank}")
    dist.destroy_process_group()


def test_vocab_parallel_chunked_equals_full(tmp_path):
    from model_fixtures import _free_port

    out = str(tmp_path / "tp")
    mp.spawn(_tp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    hidden, weight, labels = _inputs(n=90, v=1000, seed=7)
    full = _loss_and_grads(full_linear_cross_entropy, hidden, weight, labels, torch.ones(90))
    parts = [torch.load(f"{out}.{r}") for r in range(2)]
    for p in parts:  # every TP rank sees the full per-token loss
        assert (p["loss"] - full[0]).abs().max().item() <= 1e-5
    # the caller's TP region mapping all-reduces the hidden gradient: sum of the partials
    assert (parts[0]["grad_h"] + parts[1]["grad_h"] - full[1]).abs().max().item() <= 1e-5
    assert (torch.cat([p["grad_w"] for p in parts]) - full[2]).abs().max().item() <= 1e-5


# ---- through the model: output_processor vs megatron's own loss ----------------------------


@pytest.fixture(scope="module")
def megatron():
    from model_fixtures import init_megatron_single_process

    init_megatron_single_process()


def _model_grads(model, batch, loss_impl, hook=None):
    from prolong_nemo.training.forward_step import StepOptions, run_model

    model.zero_grad(set_to_none=True)
    per_token = run_model(model, batch, StepOptions(loss_impl, chunk_tokens=37, use_output_processor=hook))
    loss_sum, n, _ = masked_token_loss(batch["loss_mask"], per_token)
    (loss_sum / n).backward()
    return per_token.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def test_output_processor_equals_fused_model_loss(megatron):
    from model_fixtures import collate_row, make_row, tiny_arch

    from prolong_nemo.model.builder import build_gpt_model

    arch = tiny_arch()
    model = build_gpt_model(arch, 256, backend="local")
    batch = collate_row(make_row([40, 70, 25], arch.vocab_size, seed=11))
    fused_loss, fused_grads = _model_grads(model, batch, "fused")
    assert fused_loss.abs().max() > 1.0
    # through the output_processor hook where megatron-core has it, and always the fallback
    from prolong_nemo.model.loss import supports_output_processor

    for hook in (True, False) if supports_output_processor(model) else (False,):
        chunk_loss, chunk_grads = _model_grads(model, batch, "chunked", hook=hook)
        assert fused_loss.shape == chunk_loss.shape == batch["tokens"].shape
        assert (fused_loss - chunk_loss).abs().max().item() <= 1e-5
        for name, g in fused_grads.items():
            assert (g - chunk_grads[name]).abs().max().item() <= 1e-5, (hook, name)
    assert model.post_process  # the fallback restores the flag


def test_every_loss_path_runs_the_output_layer_hooks_once_per_micro_batch(megatron):
    """megatron DDP's forward pre-hook on output_layer waits for the weight's all-gather
    (overlap_param_gather); a path that reads the weight without it crashes at iteration 3
    (the real loop: tests/test_bridge_pretrain.py)."""
    from model_fixtures import collate_row, make_row, tiny_arch

    from prolong_nemo.model.builder import build_gpt_model
    from prolong_nemo.model.loss import supports_output_processor

    arch = tiny_arch()
    model = build_gpt_model(arch, 256, backend="local")
    batch = collate_row(make_row([40, 70, 25], arch.vocab_size, seed=11))
    calls = []
    handle = model.output_layer.register_forward_pre_hook(lambda module, args: calls.append(module))
    try:
        paths = [("fused", None), ("chunked", False)]
        if supports_output_processor(model):
            paths.append(("chunked", True))
        for loss_impl, hook in paths:
            calls.clear()
            _model_grads(model, batch, loss_impl, hook=hook)
            assert calls == [model.output_layer], (loss_impl, hook)
    finally:
        handle.remove()
    assert "forward" not in vars(model.output_layer)  # the layer's own forward is back


# ---- per-token averaging across micro-batches ----------------------------------------------


def test_per_token_loss_is_global_token_mean_across_micro_batches(megatron):
    """Two micro-batches with very different target counts: megatron's schedule + our
    finalize must give the gradient of (sum of all token losses) / (all tokens), not the
    mean of per-micro-batch means."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from model_fixtures import collate_row, make_row, tiny_arch

    from prolong_nemo.model.builder import build_gpt_model
    from prolong_nemo.model.loss import global_token_mean
    from prolong_nemo.training.cpu.runner import finalize_grads
    from prolong_nemo.training.forward_step import StepOptions, make_forward_step, run_model

    arch = tiny_arch()
    torch.manual_seed(0)  # the init is this test's own, whatever ran before it
    model = build_gpt_model(arch, 256, backend="local")
    model.config.finalize_model_grads_func = finalize_grads
    batches = [
        collate_row(make_row([12], arch.vocab_size, seed=1)),  # 11 targets
        collate_row(make_row([100, 60], arch.vocab_size, seed=2)),  # 158 targets
    ]
    model.zero_grad(set_to_none=True)
    reports = get_forward_backward_func()(
        forward_step_func=make_forward_step(StepOptions("chunked", chunk_tokens=50)),
        data_iterator=iter(batches), model=[model], num_microbatches=2, seq_length=256,
        micro_batch_size=1, forward_only=False,
    )
    scheduled = {k: p.grad.clone() for k, p in model.named_parameters()}

    model.zero_grad(set_to_none=True)
    losses = [run_model(model, b, StepOptions("fused")) for b in batches]
    total = sum((l * b["loss_mask"]).sum() for l, b in zip(losses, batches))
    count = sum(b["loss_mask"].sum() for b in batches)
    (total / count).backward()
    assert count.item() == 11 + 158
    assert abs(global_token_mean(reports) - (total / count).item()) <= 1e-6
    for name, p in model.named_parameters():
        assert (scheduled[name] - p.grad).abs().max().item() <= 1e-6, name
    # and it is not the mean of micro-batch means (the test can tell them apart). Compared on
    # the gradients: at initialization every token's loss is about ln(vocab), so the two means
    # can agree to 1e-4 in value (this check once compared values and failed whenever the
    # unseeded init made them agree); their gradients weight the tokens 1/22 vs 1/169.
    model.zero_grad(set_to_none=True)
    losses = [run_model(model, b, StepOptions("fused")) for b in batches]
    per_mb = [(l * b["loss_mask"]).sum() / b["loss_mask"].sum() for l, b in zip(losses, batches)]
    (sum(per_mb) / 2).backward()
    gap = max((scheduled[n] - p.grad).abs().max().item() / scheduled[n].abs().max().item()
              for n, p in model.named_parameters() if scheduled[n].abs().max() > 0)
    assert gap > 0.1, gap


def test_out_of_vocab_labels_are_not_ignored_but_masked_by_loss_mask():
    """No ignore index (megatron semantics): a -100 label costs log-sum-exp and, once the loss
    mask zeroes it, contributes no gradient; the other tokens are untouched."""
    hidden, weight, labels = _inputs(n=40, v=200, seed=9)
    bad = labels.clone()
    bad[::3] = -100
    mask = (bad >= 0).float()
    ours = chunked_linear_cross_entropy(hidden, weight, bad, chunk_tokens=9)
    logits = hidden.detach().double() @ weight.detach().double().t()
    lse = torch.logsumexp(logits, dim=-1)
    assert (ours.detach().double()[::3] - lse[::3]).abs().max().item() <= 1e-5
    (ours * mask).sum().backward()
    g_h, g_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    keep = mask.bool()
    ref = full_linear_cross_entropy(hidden[keep], weight, labels[keep])
    ref.sum().backward()
    assert (ours.detach()[keep] - ref.detach()).abs().max().item() <= 1e-5
    assert g_h[~keep].abs().max().item() == 0.0
    assert (g_h[keep] - hidden.grad[keep]).abs().max().item() <= 1e-5
    assert (g_w - weight.grad).abs().max().item() <= 1e-5


def test_weight_gradient_accumulates_into_megatron_main_grad():
    """Under megatron's DDP (fp32 `main_grad` + `grad_added_to_main_grad`), the chunks' weight
    gradients land in main_grad on top of what is there, and DDP is told so."""
    hidden, weight, labels = _inputs(seed=4, dtype=torch.bfloat16)
    grad_out = torch.rand(labels.shape, generator=torch.Generator().manual_seed(5))
    reference = _loss_and_grads(lambda h, w, y: chunked_linear_cross_entropy(h, w, y, chunk_tokens=64),
                                hidden, weight, labels, grad_out)[2].float()
    earlier = torch.randn(weight.shape, generator=torch.Generator().manual_seed(6))  # a previous micro-batch
    weight.main_grad, weight.grad_added_to_main_grad = earlier.clone(), False
    hidden.grad = weight.grad = None
    chunked_linear_cross_entropy(hidden, weight, labels, chunk_tokens=64).backward(grad_out)
    assert weight.grad_added_to_main_grad is True
    # fp32 accumulation of bf16 chunk GEMMs: the only difference is the final bf16 cast of the reference
    torch.testing.assert_close(weight.main_grad - earlier, reference, rtol=1e-2, atol=1e-2)
    assert (weight.main_grad - earlier).abs().max() > 1e-1


# ---- bf16 weight gradient: fp32 accumulation across many chunks ----------------------------


def _bf16_exact_logit_inputs(n=2048, h=64, v=512, seed=0):
    """bf16 hidden and weight whose logits are small multiples of 1/4, exact in bf16: the
    logits GEMM adds no rounding, so what is left to measure is the weight-gradient path."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-2, 3, (n, h), generator=g).bfloat16().requires_grad_()
    weight = (torch.randint(-2, 3, (v, h), generator=g) * 0.25).bfloat16().requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    grad_out = torch.rand(n, generator=g)
    return hidden, weight, labels, grad_out


def _float64_weight_grad(hidden, weight, labels, grad_out):
    h64, w64 = hidden.detach().double(), weight.detach().double()
    logits = h64 @ w64.t()
    assert torch.equal((hidden.detach() @ weight.detach().t()).double(), logits)  # exact in bf16
    dlogits = torch.softmax(logits, dim=-1)
    dlogits[torch.arange(labels.numel()), labels] -= 1.0
    return (dlogits * grad_out.double()[:, None]).t() @ h64


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("into_main_grad", [False, True])
def test_bf16_weight_gradient_is_accumulated_in_fp32_across_chunks(into_main_grad, seed):
    """64 chunks of bf16 hidden/weight: each chunk's weight gradient must reach the fp32
    accumulator unrounded (megatron's wgrad_gemm_accum_fp32), not as a bf16 GEMM output.
    Measured against the float64 gradient of the same bf16 inputs: rounding every chunk's
    product to bf16 leaves ~43% of the bf16 .grad entries off the correctly rounded value and
    main_grad off by ~2e-3 of its largest entry; fp32 accumulation: <0.05% and ~5e-7.
    These bounds are for CPU, where the GEMM runs in fp32 on the fp32 logits gradient. CUDA's
    bf16 GEMM with fp32 output uses the bf16 logits gradient, as megatron does (~1.5e-3 here)."""
    hidden, weight, labels, grad_out = _bf16_exact_logit_inputs(seed=seed)
    chunk = 32
    assert labels.numel() // chunk >= 32
    ref = _float64_weight_grad(hidden, weight, labels, grad_out)
    if not into_main_grad:  # plain autograd: fp32 accumulator, cast to bf16 once at the end
        chunked_linear_cross_entropy(hidden, weight, labels, chunk_tokens=chunk).backward(grad_out)
        assert weight.grad.dtype == torch.bfloat16
        not_rounded_once = (weight.grad != ref.to(torch.bfloat16)).double().mean().item()
        assert not_rounded_once <= 0.01, not_rounded_once
        return
    # megatron DDP: straight into the fp32 main_grad, on top of an earlier micro-batch's
    earlier = torch.randn(weight.shape, generator=torch.Generator().manual_seed(6))
    weight.main_grad, weight.grad_added_to_main_grad = earlier.clone(), False
    chunked_linear_cross_entropy(hidden, weight, labels, chunk_tokens=chunk).backward(grad_out)
    assert weight.grad_added_to_main_grad is True
    err = ((weight.main_grad - earlier).double() - ref).abs().max() / ref.abs().max()
    assert err.item() <= 1e-5, err.item()
