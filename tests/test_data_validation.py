"""Bad input is an error that names the domain folder, the shard and the sample."""

import json
import os

import numpy as np
import pytest

from prolong_nemo.data.dataset import build_datasets, dataset_config
from prolong_nemo.data.mds import DataError, MdsDomain, validate_sample, write_domain
from prolong_nemo.data.mixture import Mixture

from data_fixtures import write_random_domain


def good(length=16, **overrides):
    sample = {"input_ids": np.arange(1, length + 1, dtype=np.uint32),
              "indices": np.array([[0, length // 2], [length // 2, length]], dtype=np.uint32),
              "length": length, "domain": "d"}
    sample.update(overrides)
    return sample


def read_bad(tmp_path, bad: dict, **write_kwargs):
    """Write [good, good, bad] into one shard and read sample 2."""
    folder = tmp_path / "dom"
    write_domain(str(folder), [good(), good(), bad], **write_kwargs)
    domain = MdsDomain(str(folder))
    domain[0]
    with pytest.raises(DataError) as err:
        domain[2]
    message = str(err.value)
    assert str(folder) in message and "shard.00000.mds" in message and "sample 2" in message, message
    return message


@pytest.mark.parametrize("bad, expected", [
    (good(indices=np.array([[0, 8], [8, 17]], dtype=np.uint32)), "out of range"),
    (good(indices=np.array([[8, 16], [0, 8]], dtype=np.uint32)), "unsorted or overlap"),
    (good(indices=np.array([[0, 9], [8, 16]], dtype=np.uint32)), "unsorted or overlap"),
    (good(indices=np.array([0, 8, 8, 16], dtype=np.uint32)), "shape (n_docs, 2)"),
    ({**good(), "length": 15}, "length 15 disagrees with len(input_ids) 16"),
    (good(input_ids=np.array([1, 2, 128256, 3] * 4, dtype=np.uint32)), "token id 128256 at position 2"),
])
def test_bad_samples(tmp_path, bad, expected):
    assert expected in read_bad(tmp_path, bad)


def test_empty_sample():
    # MDSWriter refuses empty arrays, but other writers do not: the check sits on decoded samples.
    raw = {"input_ids": np.zeros(0, np.uint32), "length": 0, "domain": "d"}
    with pytest.raises(DataError, match="dom/shard.00007.mds: sample 3: empty sample"):
        validate_sample(raw, "dom/shard.00007.mds: sample 3", vocab_size=128256)


def test_mask_length_mismatch(tmp_path):
    ok = np.ones(16, dtype=np.uint8)
    folder = tmp_path / "dom"
    write_domain(str(folder), [good(mask=ok), good(mask=ok), good(mask=np.ones(15, np.uint8))], with_mask=True)
    with pytest.raises(DataError, match=r"shard.00000.mds: sample 2 .*mask has 15 entries but input_ids has 16"):
        MdsDomain(str(folder))[2]


def test_wrong_dtype_column(tmp_path):
    folder = tmp_path / "dom"
    columns = {"input_ids": "ndarray:float32", "length": "int", "domain": "str"}
    write_domain(str(folder), [{"input_ids": np.ones(4, np.float32), "length": 4, "domain": "d"}], columns=columns)
    with pytest.raises(DataError, match=r"dom/shard.00000.mds: column 'input_ids' has encoding 'ndarray:float32'"):
        MdsDomain(str(folder))


def test_missing_and_invalid_index(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match=r"empty_dir: no index.json"):
        MdsDomain(str(tmp_path / "empty_dir"))
    with pytest.raises(DataError, match=r"nowhere: domain folder does not exist"):
        MdsDomain(str(tmp_path / "nowhere"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "index.json").write_text("{not json")
    with pytest.raises(DataError, match=r"bad/index.json: invalid MDS index"):
        MdsDomain(str(bad))
    (bad / "index.json").write_text(json.dumps({"version": 2, "shards": [{"format": "mds"}]}))
    with pytest.raises(DataError, match=r"bad: shard #0: invalid shard entry"):
        MdsDomain(str(bad))


def test_empty_domain(tmp_path):
    write_domain(str(tmp_path / "dom"), [])
    with pytest.raises(DataError, match="dom: domain is empty"):
        MdsDomain(str(tmp_path / "dom"))


@pytest.mark.parametrize("spec, expected", [
    ("a=-0.1,b=1", "proportion must be a finite number >= 0"),
    ("a=0,b=0", "all zero"),
    ("a=nan", "finite"),
    ("a=x", "is not a number"),
    ("a=1,a=2", "listed twice"),
    ("", "no domains"),
])
def test_bad_mixtures(spec, expected):
    with pytest.raises(DataError, match=expected):
        Mixture.parse(spec)


def test_unknown_domain_in_mixture_fails_at_build(tmp_path):
    write_random_domain(tmp_path / "a", 4, 32)
    mixture = Mixture.parse({"a": 0.5, "missing": 0.5}, root=str(tmp_path))
    with pytest.raises(DataError, match=r"missing: domain folder does not exist"):
        build_datasets(dataset_config(mixture, sequence_length=32), [10, None, None])


def test_sample_longer_than_sequence_length(tmp_path):
    write_random_domain(tmp_path / "a", 4, 64)
    train, *_ = build_datasets(dataset_config(Mixture.parse(str(tmp_path / "a")), sequence_length=32), [4, 0, 0])
    with pytest.raises(DataError, match=r"a: sample \d has 64 tokens, more than the stage's sequence_length 32"):
        train[0]


def test_missing_shard_file(tmp_path):
    write_random_domain(tmp_path / "a", 4, 32)
    os.remove(tmp_path / "a" / "shard.00000.mds")
    domain = MdsDomain(str(tmp_path / "a"))
    with pytest.raises(DataError, match=r"a/shard.00000.mds: sample 1 \(domain sample 1\): cannot decode"):
        domain[1]
