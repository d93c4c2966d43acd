"""The Megatron dataset over an MDS mixture: proportions, determinism, epochs, resume, batch keys."""

from collections import Counter

import numpy as np
import pytest
import torch

from prolong_nemo.data.dataset import BATCH_KEYS, build_datasets, collate, dataset_config
from prolong_nemo.data.mds import MdsDomain, write_domain
from prolong_nemo.data.mixture import Mixture
from prolong_nemo.data.packing import PackingConfig, build_row

from data_fixtures import write_random_domain

# ProLong's stage-1 mixture (`domains` in https://github.com/princeton-nlp/ProLong/blob/main/train_64K.sh).
STAGE1 = {"thestackv1_concat_by_repo-65536": 0.30, "book-65536": 0.30, "fineweb-edu": 0.10,
          "fineweb-2023-50": 0.10, "stackexchange": 0.04, "dolmawiki": 0.04, "tuluv2": 0.03,
          "arxiv": 0.03, "openwebmath": 0.03, "textbooks": 0.03}


@pytest.fixture(scope="module")
def stage1_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    for i, name in enumerate(STAGE1):
        write_random_domain(root / name, n=5 + i, length=64, seed=i, max_docs=6)
    return root


def build(root, n, seed=7, **kwargs):
    config = dataset_config(Mixture.parse(STAGE1, root=str(root)), sequence_length=64, seed=seed, **kwargs)
    train, valid, test = build_datasets(config, [n, None, None])
    assert valid is None and test is None
    return train


def sample_keys(train, n):
    """(domain, domain sample) behind each of the first n rows."""
    keys = []
    for i in range(n):
        dataset = train.datasets[train.dataset_index[i]]
        keys.append((int(train.dataset_index[i]), dataset.sample_index(int(train.dataset_sample_index[i]))))
    return keys


def test_proportions_hold_within_one_percent(stage1_root):
    train = build(stage1_root, 10_000)
    counts = Counter(int(d) for d in train.dataset_index[:10_000])
    for i, proportion in enumerate(STAGE1.values()):
        assert abs(counts[i] / 10_000 - proportion) / proportion < 0.01, (i, counts[i])


def test_deterministic_for_a_seed(stage1_root):
    a, b, c = build(stage1_root, 500), build(stage1_root, 500), build(stage1_root, 500, seed=8)
    assert sample_keys(a, 500) == sample_keys(b, 500)
    assert sample_keys(a, 500) != sample_keys(c, 500)
    np.testing.assert_array_equal(a[123]["tokens"], b[123]["tokens"])


def test_small_domains_cycle_through_epochs(stage1_root):
    train = build(stage1_root, 2_000)
    textbooks = list(STAGE1).index("textbooks")  # 14 samples, asked for ~60
    dataset = train.datasets[textbooks]
    n = len(dataset.indices)
    order = [dataset.sample_index(i) for i in range(len(dataset))]
    for epoch_start in range(0, len(order) - n + 1, n):
        assert sorted(order[epoch_start:epoch_start + n]) == list(range(n))  # each epoch: every sample once
    assert order[:n] != order[n:2 * n]  # a fresh order per epoch
    counts = Counter(order)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_random_access_resumes_exactly(stage1_root):
    """A fresh dataset read from `consumed_samples` gives what an uninterrupted run saw."""
    uninterrupted = build(stage1_root, 1_000)
    seen = [uninterrupted[i]["tokens"] for i in range(300)]
    resumed = build(stage1_root, 1_000)
    for i in range(250, 300):
        np.testing.assert_array_equal(resumed[i]["tokens"], seen[i])


def test_order_does_not_depend_on_where_the_data_lives(stage1_root, tmp_path):
    import shutil

    moved = tmp_path / "elsewhere"
    shutil.copytree(stage1_root, moved)
    assert sample_keys(build(stage1_root, 300), 300) == sample_keys(build(moved, 300), 300)


def test_rows_equal_build_row_of_the_domain_sample(stage1_root):
    train = build(stage1_root, 200, packing=PackingConfig(cp_size=4))
    for i in (0, 17, 199):
        domain_id = int(train.dataset_index[i])
        dataset = train.datasets[domain_id]
        sample = MdsDomain(dataset.dataset_path)[dataset.sample_index(int(train.dataset_sample_index[i]))]
        expected = build_row(sample.input_ids, sample.indices, sample.mask, PackingConfig(cp_size=4))
        row = train[i]
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(row[key], expected[key])


def test_domain_without_indices_column_is_one_document(tmp_path):
    columns = {"input_ids": "ndarray:uint32", "length": "int", "domain": "str"}
    ids = np.arange(5, 25, dtype=np.uint32)
    write_domain(str(tmp_path / "raw"), [{"input_ids": ids, "length": 20, "domain": "raw"}], columns=columns)
    train, *_ = build_datasets(dataset_config(Mixture.parse(str(tmp_path / "raw")), sequence_length=20), [3, 0, 0])
    row = train[2]  # third epoch of a one-sample domain
    np.testing.assert_array_equal(row["cu_seqlens_q"], [0, 20])
    np.testing.assert_array_equal(row["labels"][:19], ids[1:])
    assert row["loss_mask"].sum() == 19


def test_collate_matches_the_batch_contract(stage1_root):
    train = build(stage1_root, 10, packing=PackingConfig(cp_size=2))
    loader = torch.utils.data.DataLoader(train, batch_size=1, collate_fn=train.collate_fn)
    batch = next(iter(loader))
    assert list(batch) == list(BATCH_KEYS)
    T = batch["tokens"].shape[1]
    for key in ("tokens", "labels", "position_ids"):
        assert batch[key].dtype == torch.int64 and batch[key].shape == (1, T)
    assert batch["loss_mask"].dtype == torch.float32
    assert batch["cu_seqlens_q"].dtype == torch.int32 and batch["cu_seqlens_q"][0, -1] == T
    assert batch["max_seqlen_q"].shape == (1, 1)
    with pytest.raises(ValueError, match="micro-batch size 1"):
        collate([train[0], train[1]])


# Megatron-Bridge's packed-sequence keys, pinned from upstream src/megatron/bridge/training/gpt_step.py
# (_CURRENT_PACKED_SEQ_DEVICE_KEYS / _HOST_KEYS, and the legacy 0.5 keys). Bridge cannot be
# installed on a CPU machine, so the names are pinned here from the source we read.
BRIDGE_CURRENT_KEYS = {"cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded",
                       "max_seqlen_q", "max_seqlen_kv"}
BRIDGE_LEGACY_KEYS = {"cu_seqlens", "cu_seqlens_argmin", "max_seqlen"}
BRIDGE_TRAINING_KEYS = {"tokens", "labels", "loss_mask", "position_ids"}


def test_batch_carries_bridge_packed_keys():
    assert BRIDGE_CURRENT_KEYS | BRIDGE_LEGACY_KEYS | BRIDGE_TRAINING_KEYS == set(BATCH_KEYS)


def test_remote_domain_is_cached_locally(tmp_path, monkeypatch):
    """Remote folders go through streaming's downloaders into the cache (a fake scheme here)."""
    from streaming.base.storage import download

    class FakeRemote(download.LocalDownloader):
        @staticmethod
        def _client_identifier():
            return "fake"

        def _download_file_impl(self, remote, local, timeout):
            super()._download_file_impl(remote.removeprefix("fake://"), local, timeout)

    monkeypatch.setitem(download.DOWNLOADER_MAPPINGS, "fake", FakeRemote)
    samples = write_random_domain(tmp_path / "bucket" / "dom", 3, 32)
    domain = MdsDomain(f"fake://{tmp_path}/bucket/dom", cache_dir=str(tmp_path / "cache"))
    np.testing.assert_array_equal(domain[2].input_ids, samples[2]["input_ids"])
    cached = list((tmp_path / "cache").rglob("*"))
    assert {p.name for p in cached if p.is_file()} == {"index.json", "shard.00000.mds"}
