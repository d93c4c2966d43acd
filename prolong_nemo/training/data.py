"""The data of a run: a recipe's mixture as the data adapter's datasets, for either backend.

`dataset_fields` are declarative values only (Bridge saves its dataset provider as YAML);
`build_prolong_datasets` turns them into Megatron datasets of packed rows.
"""

from __future__ import annotations

from typing import Any

from prolong_nemo.recipes.config import RecipeConfig


def dataset_fields(recipe: RecipeConfig) -> dict[str, Any]:
    """Fields of `ProLongDatasetProvider` (declarative values only: Bridge saves them as YAML)."""
    d, par = recipe.data, recipe.parallel
    return dict(
        domains=[{"path": p, "proportion": w} for p, w in d.domain_paths()],
        seq_length=d.sequence_length,
        seed=d.seed,
        document_masking=d.document_masking,
        instruction_masks=d.instruction_masks,
        cp_size=par.cp,
        tp_size=par.tp,
        sequence_parallel=par.sequence_parallel,
        vocab_size=recipe.arch.vocab_size,
        cache_dir=d.cache_dir,
        balance=d.balance,
        global_batch_size=recipe.train.global_batch_size,
        preset=recipe.model.preset,
        num_workers=d.num_workers,
        persistent_workers=d.num_workers > 0,
        dataloader_type="single",  # sampler starts at consumed_train_samples: exact data resume
        pin_memory=True,
        drop_last=True,
    )



def build_prolong_datasets(*, domains: list[dict], seq_length: int, seed: int, document_masking: bool,
                           cp_size: int, tp_size: int, sequence_parallel: bool, vocab_size: int,
                           cache_dir: str | None, train_samples: int, valid_samples: int = 0,
                           test_samples: int = 0, instruction_masks: bool = True, balance: bool = False,
                           global_batch_size: int = 1, dp_size: int = 1, preset: str = "llama3-8b") -> list:
    """Train / valid / test datasets of the data adapter for a provider's fields.

    `instruction_masks`: the reference applies MDS `mask` columns only in SFT
    (`apply_instruct_masks`); stages 1 and 2 train on every token of tuluv2 too.
    `balance`: the train split's global batches of `global_batch_size` are spread over the
    `dp_size` data-parallel ranks by the FLOP cost of model `preset` (data/balance.py;
    micro-batches of one packed row, as the recipes run).
    """
    from prolong_nemo.data.balance import Balancing, CostModel
    from prolong_nemo.data.dataset import build_datasets, dataset_config
    from prolong_nemo.data.mixture import Mixture
    from prolong_nemo.data.packing import PackingConfig
    from prolong_nemo.model.config import preset as arch_of

    mixture = Mixture.parse([(d["path"], d["proportion"]) for d in domains])
    packing = PackingConfig(cp_size=cp_size, tp_size=tp_size, sequence_parallel=sequence_parallel,
                            document_masking=document_masking, instruction_masks=instruction_masks)
    config = dataset_config(mixture, sequence_length=seq_length, seed=seed, packing=packing,
                            vocab_size=vocab_size, cache_dir=cache_dir)
    sizes = [train_samples, valid_samples or None, test_samples or None]
    balancing = (Balancing(global_batch_size, 1, dp_size, CostModel.from_arch(arch_of(preset)))
                 if balance and dp_size > 1 else None)
    return build_datasets(config, sizes, balance=balancing)
