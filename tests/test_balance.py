"""Cost-balanced global batches (prolong_nemo/data/balance.py): same samples per step, a pure
function of the data, the split Megatron's sampler hands each DP rank, and the same loss."""

from __future__ import annotations

import itertools
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
from data_fixtures import write_random_domain

from prolong_nemo.data.balance import LLAMA3_8B_COST, BalancedDataset, Balancing, CostModel, assign_block, rank_costs
from prolong_nemo.data.mds import PACKED_COLUMNS, MdsDomain, mds_document_bounds, write_domain


class Rows:
    """A dataset of rows carrying only `cu_seqlens` (the default, row-reading length path)."""

    def __init__(self, doc_lengths: list[list[int]]):
        self.docs = doc_lengths
        self.reads = 0

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, idx):
        self.reads += 1
        return {"cu_seqlens": np.concatenate([[0], np.cumsum(self.docs[idx])]).astype(np.int32), "id": idx}


def skewed_docs(n: int, length: int = 65536, seed: int = 0, long_share: float = 0.6) -> list[list[int]]:
    """Rows like ProLong's 64K mix: a whole long document, or ~1-4K documents packed."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        if rng.random() < long_share:
            rows.append([length])
        else:
            docs = rng.integers(1000, 4000, length // 1000)
            docs = docs[np.cumsum(docs) <= length].tolist()
            rows.append(docs + ([length - sum(docs)] if sum(docs) < length else []))
    return rows


def costs_of(docs):
    return np.array([LLAMA3_8B_COST(np.array(d)) for d in docs])


def per_rank_max(costs_by_position, gbs, dp, mbs):
    """Sum over full steps of the slowest rank's cost (the step time the cost model predicts)."""
    steps = len(costs_by_position) // gbs
    return sum(rank_costs(costs_by_position[s * gbs:(s + 1) * gbs], dp, mbs).max() for s in range(steps))


def test_cost_model_is_llama3_8b_shaped():
    """One 64K document costs about 2x 64 documents of 1K (the issue's figure); tokens alone say 1x."""
    one, many = LLAMA3_8B_COST(np.array([65536])), LLAMA3_8B_COST(np.full(64, 1024))
    assert 1.9 < one / many < 2.3
    assert LLAMA3_8B_COST.dense_per_token == pytest.approx(6 * 7.5e9, rel=0.01)  # ~7.5B matmul weights
    # at 512K attention dominates
    assert LLAMA3_8B_COST.attention_per_token2 * 524288 > 8 * LLAMA3_8B_COST.dense_per_token
    tiny = CostModel(dense_per_token=1.0, attention_per_token2=0.5)
    assert tiny(np.array([2, 4])) == 6 + 0.5 * 20


SIZES = [(gbs, dp, mbs) for gbs, dp, mbs in itertools.product([1, 2, 4, 6, 8, 12, 16, 64], [1, 2, 3, 4, 8, 16], [1, 2])
         if gbs % (dp * mbs) == 0]


@pytest.mark.parametrize("gbs,dp,mbs", SIZES)
def test_every_global_batch_keeps_its_samples(gbs, dp, mbs):
    """Exhaustive over the sizes: each block is a permutation of itself, with and without a
    trailing partial global batch (whose last incomplete micro-step keeps its order)."""
    for extra in sorted({0, 1, dp * mbs, gbs - 1} - {gbs}):
        n = 3 * gbs + extra
        view = BalancedDataset(Rows(skewed_docs(n, seed=gbs + dp)), gbs, mbs, dp)
        assert len(view) == n
        sources = [view.source_index(i) for i in range(n)]
        assert sorted(sources) == list(range(n))
        for start in range(0, n, gbs):
            block = sources[start:start + gbs]
            assert sorted(block) == list(range(start, min(start + gbs, n)))
        tail = n % gbs % (dp * mbs)
        assert sources[n - tail:] == list(range(n - tail, n))
        assert view[n - 1]["id"] == sources[n - 1]


def test_rows_come_from_the_permuted_index():
    docs = skewed_docs(32, seed=3)
    view = BalancedDataset(Rows(docs), 16, 1, 4)
    for i in range(32):
        assert view[i]["id"] == view.source_index(i)
    assert any(view.source_index(i) != i for i in range(32))  # skewed data: something moved
    with pytest.raises(IndexError):
        view.source_index(32)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="multiple"):
        BalancedDataset(Rows([[1]] * 8), 6, 1, 4)
    with pytest.raises(ValueError):
        BalancedDataset(Rows([[1]] * 8), 8, 0, 4)


def test_deterministic_across_instances_and_reads():
    docs = skewed_docs(200, seed=5)
    a, b = BalancedDataset(Rows(docs), 64, 1, 8), BalancedDataset(Rows(docs), 64, 1, 8)
    forward = [a.source_index(i) for i in range(200)]
    backward = [b.source_index(i) for i in reversed(range(200))][::-1]  # another access order, cache evictions
    assert forward == backward


PROCESS = """
import json, sys
import numpy as np
from prolong_nemo.data.balance import BalancedDataset
docs = json.loads(sys.argv[1])
view = BalancedDataset(docs, 16, 1, 4, segment_lengths=lambda i: np.array(docs[i]))
print(json.dumps([view.source_index(i) for i in range(len(docs))]))
"""


def test_deterministic_across_processes():
    """A fresh interpreter (another rank, or a resumed job) computes the same permutation."""
    docs = skewed_docs(40, seed=9)
    here = BalancedDataset(docs, 16, 1, 4, segment_lengths=lambda i: np.array(docs[i]))
    out = subprocess.run([sys.executable, "-c", PROCESS, json.dumps(docs)], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [here.source_index(i) for i in range(40)]


@pytest.mark.parametrize("gbs,dp,mbs", [(64, 4, 1), (64, 8, 1), (64, 16, 1), (16, 8, 1), (16, 4, 1), (64, 4, 2)])
def test_slowest_rank_is_never_slower_and_close_to_the_mean(gbs, dp, mbs):
    docs = skewed_docs(20 * gbs, seed=gbs * dp + mbs)
    costs = costs_of(docs)
    view = BalancedDataset(Rows(docs), gbs, mbs, dp)
    balanced = costs[[view.source_index(i) for i in range(len(docs))]]
    for s in range(20):
        block = slice(s * gbs, (s + 1) * gbs)
        before, after = rank_costs(costs[block], dp, mbs), rank_costs(balanced[block], dp, mbs)
        assert after.sum() == pytest.approx(before.sum())
        assert after.max() <= before.max()
        # within one sample's cost difference of the mean; with enough samples per rank, near it
        assert after.max() <= after.mean() + costs[block].max() - costs[block].min()
        if gbs // dp >= 8:
            assert after.max() <= 1.1 * after.mean()
    assert per_rank_max(balanced, gbs, dp, mbs) < per_rank_max(costs, gbs, dp, mbs)


def test_random_costs_never_raise_the_slowest_rank():
    """LPT is a heuristic: where it would not help, the block keeps its order."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        dp, mbs = int(rng.choice([2, 3, 4])), int(rng.choice([1, 2]))
        costs = rng.choice([1.0, 2.0, 3.0, 5.0], size=dp * mbs * int(rng.integers(1, 4)))
        order = assign_block(costs, dp, mbs)
        assert sorted(order.tolist()) == list(range(len(costs)))
        assert rank_costs(costs[order], dp, mbs).max() <= rank_costs(costs, dp, mbs).max()


def test_each_rank_runs_its_largest_sample_first():
    costs = np.array([5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0])
    order = assign_block(costs, 2, 1)
    for rank in range(2):
        mine = costs[order].reshape(-1, 2)[:, rank]
        assert list(mine) == sorted(mine, reverse=True)
    assert sorted(rank_costs(costs[order], 2, 1)) == [19.0, 20.0]


@pytest.mark.parametrize("gbs,dp,mbs", [(16, 4, 1), (16, 2, 2), (12, 3, 2), (8, 8, 1)])
def test_megatron_sampler_hands_each_rank_its_balanced_share(gbs, dp, mbs):
    """Through megatron-core's own `MegatronPretrainingSampler`: rank r's micro-batches of a step
    are exactly the samples LPT gave rank r, largest first; resuming at `consumed_samples` of a
    step boundary continues with the same rows."""
    from megatron.training.datasets.data_samplers import MegatronPretrainingSampler

    docs = skewed_docs(5 * gbs, seed=gbs + dp)
    costs = costs_of(docs)
    view = BalancedDataset(Rows(docs), gbs, mbs, dp)
    steps = {}
    for rank in range(dp):
        sampler = MegatronPretrainingSampler(len(view), 0, mbs, rank, dp)
        micro = [[view.source_index(i) for i in batch] for batch in sampler]
        per_step = len(micro) // 5
        steps[rank] = [list(itertools.chain(*micro[s * per_step:(s + 1) * per_step])) for s in range(5)]
        resumed = MegatronPretrainingSampler(len(view), 2 * gbs, mbs, rank, dp)
        fresh = BalancedDataset(Rows(docs), gbs, mbs, dp)
        assert [[fresh.source_index(i) for i in b] for b in resumed] == micro[2 * per_step:]
    for s in range(5):
        block = np.arange(s * gbs, (s + 1) * gbs)
        assert sorted(itertools.chain(*(steps[r][s] for r in range(dp)))) == block.tolist()
        order = view.block_order(s)
        for rank in range(dp):
            mine = steps[rank][s]
            intended = [s * gbs + int(order[m * mbs * dp + rank * mbs + j]) for m in range(gbs // (mbs * dp))
                        for j in range(mbs)]
            assert mine == intended
            if (order != np.arange(gbs)).any():  # balanced (not kept as it was): largest first
                assert list(costs[mine]) == sorted(costs[mine], reverse=True)
        loads = [costs[steps[r][s]].sum() for r in range(dp)]
        assert max(loads) <= rank_costs(costs[block], dp, mbs).max()


# ---- real MDS domains: lengths without building rows ----------------------------------------


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    root = tmp_path_factory.mktemp("balance")
    write_random_domain(root / "long", n=24, length=256, seed=1, max_docs=2)
    write_random_domain(root / "short", n=30, length=256, seed=2, max_docs=40)
    rng = np.random.default_rng(3)  # no indices column: one document per sample
    write_domain(str(root / "whole"), [{"input_ids": rng.integers(0, 1000, 256).astype(np.uint32), "length": 256,
                                        "domain": "whole"} for _ in range(9)],
                 columns={k: v for k, v in PACKED_COLUMNS.items() if k != "indices"})
    return root


def build(root, spec, n, balance=None, cp_size=1):
    from prolong_nemo.data.dataset import build_datasets, dataset_config
    from prolong_nemo.data.mixture import Mixture
    from prolong_nemo.data.packing import PackingConfig

    config = dataset_config(Mixture.parse(spec, root=str(root)), sequence_length=256, seed=3,
                            packing=PackingConfig(cp_size=cp_size))
    return build_datasets(config, [n, None, None], balance=balance)[0]


@pytest.mark.parametrize("cp_size", [1, 2])
@pytest.mark.parametrize("spec", [{"long": 0.5, "short": 0.4, "whole": 0.1}, {"short": 1.0}])
def test_mds_lengths_equal_the_rows_segments(domains, spec, cp_size):
    """The cheap path (indices + length columns, no tokens, no row) gives every row's
    `cu_seqlens` differences, through Megatron's BlendedDataset and a single domain alike."""
    plain = build(domains, spec, 64, cp_size=cp_size)
    view = build(domains, spec, 64, balance=Balancing(16, 1, 4), cp_size=cp_size)
    n = len(plain)  # a blend may hold a sample more than asked: a partial last global batch
    assert len(view) == n >= 64 and view.collate_fn is plain.collate_fn
    for i in range(n):
        assert view.segment_lengths(i).tolist() == np.diff(plain[i]["cu_seqlens"]).tolist()
        got, want = view[i], plain[view.source_index(i)]
        assert all(np.array_equal(got[k], want[k]) for k in want)
    assert sorted(view.source_index(i) for i in range(n)) == list(range(n))
    # dataloader workers under spawn / forkserver get a pickled copy that reads the same rows
    copy = pickle.loads(pickle.dumps(view))
    assert [copy.source_index(i) for i in range(n)] == [view.source_index(i) for i in range(n)]
    assert copy.unique_description == plain.unique_description  # other attributes: the wrapped dataset's


@pytest.mark.parametrize("name", ["short", "whole"])
def test_mds_fast_path_reads_no_tokens(domains, monkeypatch, name):
    domain = MdsDomain(str(domains / name))
    expected = [(len(domain[i].input_ids), domain[i].indices) for i in range(len(domain))]
    monkeypatch.setattr(MdsDomain, "__getitem__", lambda self, idx: pytest.fail("full read"))
    for i, (n, indices) in enumerate(expected):
        got_n, got = mds_document_bounds(domain, i)
        assert got_n == n
        assert (got is None and indices is None) or np.array_equal(got, indices)


def test_mds_without_length_column_falls_back_to_the_full_read(tmp_path):
    ids = np.arange(1, 41, dtype=np.uint32)
    columns = {k: v for k, v in PACKED_COLUMNS.items() if k != "length"}
    write_domain(str(tmp_path / "d"), [{"input_ids": ids, "indices": np.array([[0, 10], [10, 40]], np.uint32),
                                        "domain": "d"}], columns=columns)
    n, indices = mds_document_bounds(MdsDomain(str(tmp_path / "d")), 0)
    assert n == 40 and indices.tolist() == [[0, 10], [10, 40]]


# ---- the step's loss -------------------------------------------------------------------------


def step_rows(view, dp, mbs, step, gbs):
    """Every DP rank's micro-batch rows of one step, as megatron-core's sampler reads them."""
    from megatron.training.datasets.data_samplers import MegatronPretrainingSampler

    rows = []
    for rank in range(dp):
        sampler = MegatronPretrainingSampler(len(view), step * gbs, mbs, rank, dp)
        for batch in itertools.islice(iter(sampler), gbs // (mbs * dp)):
            rows += [view[i] for i in batch]
    return rows


@pytest.fixture(scope="module")
def megatron():
    from model_fixtures import init_megatron_single_process

    init_megatron_single_process()


def test_step_loss_is_unchanged_by_balancing(megatron):
    """A tiny real model through run_model / masked_token_loss: the token-weighted mean loss over
    the union of all ranks' micro-batches of each step is the same with and without balancing
    (only the summation order differs)."""
    import torch
    from model_fixtures import collate_row, make_row, tiny_arch

    from prolong_nemo.model.builder import build_gpt_model
    from prolong_nemo.model.loss import global_token_mean, masked_token_loss
    from prolong_nemo.training.forward_step import StepOptions, run_model

    arch = tiny_arch()
    torch.manual_seed(0)
    model = build_gpt_model(arch, 256, backend="local")
    rng = np.random.default_rng(4)
    docs = [[256] if rng.random() < 0.5 else rng.integers(8, 40, 5).tolist() for _ in range(16)]
    rows = [make_row(d, arch.vocab_size, seed=i) for i, d in enumerate(docs)]

    class RowSet(Rows):
        def __getitem__(self, idx):
            return rows[idx]

    gbs, dp, mbs = 8, 4, 1
    plain, view = RowSet(docs), BalancedDataset(RowSet(docs), gbs, mbs, dp)
    assert any(view.source_index(i) != i for i in range(16))
    with torch.no_grad():
        for step in range(2):
            means = []
            for dataset in (plain, view):
                reports = [masked_token_loss(row["loss_mask"], run_model(model, row, StepOptions("fused")))[2]
                           for row in map(collate_row, step_rows(dataset, dp, mbs, step, gbs))]
                means.append(global_token_mean(reports))
            assert means[0] == pytest.approx(means[1], rel=1e-6, abs=0)


def test_dataloader_workers_read_the_balanced_rows(domains):
    """Megatron's DataLoader set-up (batch sampler + the dataset's collate_fn) with 2 workers."""
    import torch
    from megatron.training.datasets.data_samplers import MegatronPretrainingSampler

    view = build(domains, {"long": 0.6, "short": 0.4}, 32, balance=Balancing(8, 1, 2))
    sampler = MegatronPretrainingSampler(len(view), 8, 1, 1, 2)  # rank 1 of 2, resumed after one step
    loader = torch.utils.data.DataLoader(view, batch_sampler=sampler, num_workers=2, collate_fn=view.collate_fn)
    for batch, indices in zip(loader, MegatronPretrainingSampler(len(view), 8, 1, 1, 2)):
        want = view.dataset[view.source_index(indices[0])]
        assert torch.equal(batch["tokens"][0], torch.from_numpy(want["tokens"]))


def test_cost_model_is_the_flop_model():
    """The balancer's two coefficients are model/flops.py's training FLOPs of a row, exactly."""
    from prolong_nemo.model.config import preset
    from prolong_nemo.model.flops import sample_cost

    rng = np.random.default_rng(0)
    for name in ("llama3-8b", "llama3-tiny"):
        arch, cost = preset(name), CostModel.from_arch(preset(name))
        for _ in range(20):
            lengths = rng.integers(1, 70_000, size=int(rng.integers(1, 40)))
            assert cost(lengths) == pytest.approx(sample_cost(arch, lengths.tolist()), rel=1e-12)


def test_recipes_wire_balancing_into_both_backends(tmp_path):
    """data.balance (default on) reaches the dataset both backends build: Bridge's provider
    fields carry it declaratively, build_prolong_datasets wraps the train split at dp > 1 with
    the recipe model's FLOP cost, and leaves it alone at dp = 1 or when switched off."""
    from data_fixtures import write_random_domain

    from prolong_nemo.model.config import preset
    from prolong_nemo.recipes.stages import load_recipe
    from prolong_nemo.training.data import build_prolong_datasets, dataset_fields

    recipe = load_recipe("stage_64k")
    assert recipe.data.balance is True and not load_recipe("stage_64k", ["data.balance=false"]).data.balance
    fields = dataset_fields(recipe)
    assert (fields["balance"], fields["global_batch_size"], fields["preset"]) == (True, 64, "llama3-8b")
    write_random_domain(tmp_path / "d", n=16, length=256, seed=1, max_docs=6)
    common = dict(domains=[{"path": str(tmp_path / "d"), "proportion": 1.0}], seq_length=256, seed=1,
                  document_masking=True, cp_size=1, tp_size=1, sequence_parallel=False, vocab_size=128256,
                  cache_dir=None, train_samples=16, global_batch_size=8, preset="llama3-tiny")
    balanced = build_prolong_datasets(**common, balance=True, dp_size=2)[0]
    assert isinstance(balanced, BalancedDataset) and balanced.cost == CostModel.from_arch(preset("llama3-tiny"))
    assert not isinstance(build_prolong_datasets(**common, balance=True, dp_size=1)[0], BalancedDataset)
    plain = build_prolong_datasets(**common, balance=False, dp_size=2)[0]
    assert not isinstance(plain, BalancedDataset)
    for block in range(2):  # the same samples per global batch, rearranged
        ids = lambda ds: sorted(bytes(np.asarray(ds[i]["tokens"])) for i in range(block * 8, block * 8 + 8))  # noqa: E731
        assert ids(balanced) == ids(plain)
