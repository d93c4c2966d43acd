"""The Megatron-Core dataset over ProLong MDS domains.

One ``ProLongDomainDataset`` (a ``MegatronDataset``) per domain folder; the mixture is Megatron's
own ``BlendedDataset``, built by ``BlendedMegatronDatasetBuilder`` from the domain proportions, so
mixing is deterministic, exact to within one sample at every prefix, and randomly accessible by
global sample index (resuming from ``consumed_samples`` continues exactly). A domain asked for
more samples than it holds cycles through epochs, each in its own seeded order.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.datasets.utils import Split

from prolong_nemo.data.balance import Balancing
from prolong_nemo.data.mds import LLAMA3_VOCAB_SIZE, DataError, MdsDomain
from prolong_nemo.data.mixture import Mixture
from prolong_nemo.data.packing import (UNCOVERED_WARN_SHARE, PackingConfig, build_row, uncovered_tokens,
                                       uncovered_warning)

log = logging.getLogger(__name__)
COVERAGE_CHECK_SAMPLES = 8  # evenly spaced samples per domain read at build time for the report below

# The keys of docs/batch-contract.md, in order.
BATCH_KEYS = (
    "tokens", "labels", "loss_mask", "position_ids",
    "cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded",
    "max_seqlen_q", "max_seqlen_kv", "cu_seqlens", "cu_seqlens_argmin", "max_seqlen",
)


@dataclass(kw_only=True)
class ProLongDatasetConfig(BlendedMegatronDatasetConfig):
    """Megatron's dataset config plus how ProLong samples become rows.

    ``sequence_length`` is the packed sample length of the stage (65536 or 524288); longer
    samples are an error, shorter ones are fine (THD rows have no fixed length).
    """

    packing: PackingConfig = field(default_factory=PackingConfig)
    vocab_size: int = LLAMA3_VOCAB_SIZE
    cache_dir: str | None = None  # local cache for remote (object store) domains
    shuffle: bool = True


class ProLongDomainDataset(MegatronDataset):
    """The packed THD rows of one MDS domain, cycling through seeded epochs."""

    def __init__(self, dataset: MdsDomain, dataset_path: str | None, indices: np.ndarray,
                 num_samples: int | None, index_split: Split, config: ProLongDatasetConfig) -> None:
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)
        if len(indices) == 0:
            raise DataError(f"{dataset_path}: the {index_split.name} split of this domain is empty")
        # Seeded by the domain's name, not its path: the same data copied elsewhere (a local
        # NVMe cache, another mount point) is read in the same order, so resuming still matches.
        name = os.path.basename(str(dataset_path).rstrip("/"))
        self._domain_seed = int(hashlib.md5(name.encode(), usedforsecurity=False).hexdigest()[:8], 16)
        self._epochs: OrderedDict[int, np.ndarray] = OrderedDict()
        self._report_uncovered_tokens()

    def _report_uncovered_tokens(self) -> None:
        """Log the share of tokens no document covers (never trained) in a few samples; warn above 1%."""
        if not self.config.packing.document_masking:
            return  # one segment per sample: every token is in the row
        picks = np.unique(np.linspace(0, len(self.indices) - 1, COVERAGE_CHECK_SAMPLES).astype(int))
        samples = [self.dataset[int(self.indices[i])] for i in picks]
        tokens = sum(len(s.input_ids) for s in samples)
        uncovered = sum(uncovered_tokens(len(s.input_ids), s.indices) for s in samples)
        line = uncovered_warning(str(self.dataset_path), uncovered, tokens, f" in the {len(picks)} samples checked")
        if uncovered > UNCOVERED_WARN_SHARE * tokens:
            log.warning(line)
        else:
            log.info("%s: %d of %d tokens in the %d samples checked are in no document", self.dataset_path,
                     uncovered, tokens, len(picks))

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: MdsDomain) -> int:
        return len(low_level_dataset)

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: ProLongDatasetConfig) -> MdsDomain:
        return MdsDomain(dataset_path, cache_dir=config.cache_dir, vocab_size=config.vocab_size)

    def __len__(self) -> int:
        return len(self.indices) if self.num_samples is None else self.num_samples

    def sample_index(self, idx: int) -> int:
        """The domain sample behind row ``idx``: epoch ``idx // n`` in that epoch's order."""
        epoch, offset = divmod(int(idx), len(self.indices))
        order = self._epoch_order(epoch)
        return int(self.indices[order[offset] if order is not None else offset])

    def _epoch_order(self, epoch: int) -> np.ndarray | None:
        if not self.config.shuffle:
            return None
        if epoch not in self._epochs:
            rng = np.random.default_rng([self.config.random_seed, self._domain_seed, epoch])
            self._epochs[epoch] = rng.permutation(len(self.indices))
            while len(self._epochs) > 2:  # sequential reads touch one epoch, two at a boundary
                self._epochs.popitem(last=False)
        return self._epochs[epoch]

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        sample_idx = self.sample_index(idx)
        sample = self.dataset[sample_idx]
        if len(sample.input_ids) > self.config.sequence_length:
            raise DataError(f"{self.dataset_path}: sample {sample_idx} has {len(sample.input_ids)} tokens, "
                            f"more than the stage's sequence_length {self.config.sequence_length}")
        return build_row(sample.input_ids, sample.indices, sample.mask, self.config.packing,
                         where=f"{self.dataset_path}: sample {sample_idx}")


def dataset_config(mixture: Mixture, *, sequence_length: int, seed: int = 42, split: str = "100,0,0",
                   **kwargs) -> ProLongDatasetConfig:
    """The Megatron config that blends ``mixture`` (extra kwargs: ProLongDatasetConfig fields)."""
    return ProLongDatasetConfig(random_seed=seed, sequence_length=sequence_length, blend=mixture.blend(),
                                split=split, **kwargs)


def build_datasets(config: ProLongDatasetConfig, sizes: Sequence[int | None],
                   is_built_on_rank: Callable[[], bool] = lambda: True, balance: Balancing | None = None) -> list:
    """Train / valid / test datasets (None where a split is empty) of ``sizes`` samples each.

    ``balance``: the train split becomes a ``BalancedDataset`` whose global batches are spread
    over the DP ranks by cost (prolong_nemo/data/balance.py); valid / test are left as they are.
    """
    sizes = [0 if s is None else int(s) for s in sizes]  # Megatron wants a size for weighted blends
    datasets = BlendedMegatronDatasetBuilder(ProLongDomainDataset, sizes, is_built_on_rank, config).build()
    if balance is not None and datasets[0] is not None:
        datasets[0] = balance.wrap(datasets[0])
    for ds in datasets:
        if ds is not None:
            ds.collate_fn = collate  # picked up by Megatron-Bridge's dataloader and our runner
    return datasets


def collate(rows: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Stack rows (micro-batch size 1 for THD) into the batch of docs/batch-contract.md."""
    if len(rows) != 1:
        raise ValueError(f"packed THD batches have micro-batch size 1, got {len(rows)} rows")
    return {key: torch.from_numpy(np.ascontiguousarray(rows[0][key])).unsqueeze(0) for key in BATCH_KEYS}
