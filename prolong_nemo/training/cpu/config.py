"""CPU backend, configuration: recipe -> the CPU runner's `TrainConfig` and dataset."""

from __future__ import annotations

import os

from prolong_nemo.recipes.config import RecipeConfig, RecipeError
from prolong_nemo.training.data import build_prolong_datasets, dataset_fields

METRICS_FILE = "metrics.jsonl"  # in logging.tensorboard_dir: step, lm loss (full precision), tokens, seconds


def cpu_train_config(recipe: RecipeConfig, dp: int = 1, exit_after: int | None = None):
    from prolong_nemo.training.cpu.runner import TrainConfig

    if recipe.train.global_batch_size % dp:
        raise RecipeError(f"global batch {recipe.train.global_batch_size} not divisible by {dp} CPU ranks")
    o = recipe.optim
    return TrainConfig(
        preset=recipe.model.preset, rope_theta=recipe.model.rope_theta, seq_length=recipe.data.sequence_length,
        train_iters=recipe.train.steps, micro_batches=recipe.train.global_batch_size // dp, lr=o.lr,
        min_lr=o.min_lr, warmup_iters=recipe.warmup_steps, weight_decay=o.weight_decay,
        adam_betas=(o.adam_beta1, o.adam_beta2), clip_grad=o.clip_grad, loss_impl=recipe.loss.impl,
        chunk_tokens=recipe.loss.chunk_tokens, save_dir=recipe.checkpoint.dir,
        save_interval=recipe.checkpoint.save_interval, stop_after=exit_after,
        log_interval=recipe.logging.log_interval, seed=recipe.train.seed,
        # Where Bridge writes TensorBoard events, the CPU backend appends one JSON line per step.
        metrics_file=os.path.join(recipe.logging.tensorboard_dir, METRICS_FILE) if recipe.logging.tensorboard_dir
        else None,
    )


def cpu_dataset(recipe: RecipeConfig, synthetic: bool = False):
    """The recipe's MDS mixture through the data adapter (or synthetic rows for a quick demo)."""
    if synthetic:
        from prolong_nemo.training.synthetic import ArithmeticDocuments

        return ArithmeticDocuments(vocab_size=recipe.arch.vocab_size, row_tokens=recipe.data.sequence_length,
                                   seed=recipe.data.seed, cp_size=recipe.parallel.cp)
    missing = [p for p, _ in recipe.data.domain_paths() if "://" not in p and not os.path.isdir(p)]
    if missing:
        raise RecipeError(f"{recipe.name}: data domains not found: {missing} (set data.root or PROLONG_DATA_CPU)")
    import torch.distributed as dist

    f = dataset_fields(recipe)
    train, _, _ = build_prolong_datasets(
        domains=f["domains"], seq_length=f["seq_length"], seed=f["seed"], document_masking=f["document_masking"],
        cp_size=f["cp_size"], tp_size=f["tp_size"], sequence_parallel=f["sequence_parallel"],
        vocab_size=f["vocab_size"], cache_dir=f["cache_dir"], instruction_masks=f["instruction_masks"],
        train_samples=recipe.train.steps * recipe.train.global_batch_size, balance=f["balance"],
        global_batch_size=f["global_batch_size"], preset=f["preset"],
        dp_size=dist.get_world_size() if dist.is_initialized() else 1)  # the CPU runner: tp = pp = cp = 1
    return train
