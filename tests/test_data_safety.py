"""An MDS domain cannot write or read outside its folder, run code, or be read wrong (issue 13)."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from prolong_nemo.data.mds import DataError, MdsDomain, write_domain
from prolong_nemo.data.mixture import Mixture

from data_fixtures import Exploit, write_random_domain


def edit_index(folder: Path, edit) -> None:
    index = folder / "index.json"
    obj = json.loads(index.read_text())
    edit(obj["shards"])
    index.write_text(json.dumps(obj))


@pytest.fixture
def fake_remote(monkeypatch):
    """``fake://<local path>``: streaming's local downloader; a missing source serves a fixed payload."""
    from streaming.base.storage import download

    class FakeRemote(download.LocalDownloader):
        @staticmethod
        def _client_identifier():
            return "fake"

        def _download_file_impl(self, remote, local, timeout):
            source = os.path.normpath(remote.removeprefix("fake://"))
            if os.path.isfile(source):
                super()._download_file_impl(source, local, timeout)
            else:
                Path(local).write_bytes(b"attacker bytes")

    monkeypatch.setitem(download.DOWNLOADER_MAPPINGS, "fake", FakeRemote)


# ---- item 2: shard basenames stay inside the domain (and the cache) ------------------------------

def test_local_basename_cannot_read_outside_the_domain(tmp_path):
    write_random_domain(tmp_path / "other", 3, 32)
    write_random_domain(tmp_path / "dom", 3, 32)
    edit_index(tmp_path / "dom", lambda shards: shards[0]["raw_data"].update(basename="../other/shard.00000.mds"))
    with pytest.raises(DataError) as err:
        MdsDomain(str(tmp_path / "dom"))[0]
    message = str(err.value)
    assert "\n" not in message
    assert f"{tmp_path / 'dom' / 'index.json'}: shard basename '../other/shard.00000.mds'" in message
    assert "outside the domain folder" in message


@pytest.mark.parametrize("basename", [".", "sub/..", ""])
def test_basename_naming_the_folder_itself_is_refused(tmp_path, basename):
    write_random_domain(tmp_path / "dom", 3, 32)
    edit_index(tmp_path / "dom", lambda shards: shards[0]["raw_data"].update(basename=basename))
    with pytest.raises(DataError, match=rf"dom/index.json: shard basename '{re.escape(basename)}'"):
        MdsDomain(str(tmp_path / "dom"))


def test_local_absolute_basename_is_refused(tmp_path):
    write_random_domain(tmp_path / "other", 3, 32)
    write_random_domain(tmp_path / "dom", 3, 32)
    target = str(tmp_path / "other" / "shard.00000.mds")
    edit_index(tmp_path / "dom", lambda shards: shards[0]["raw_data"].update(basename=target))
    with pytest.raises(DataError, match=rf"dom/index.json: shard basename '{target}' is absolute"):
        MdsDomain(str(tmp_path / "dom"))[0]


@pytest.mark.parametrize("absolute", [False, True])
def test_remote_basename_cannot_write_outside_the_cache(tmp_path, fake_remote, absolute):
    bucket = tmp_path / "bucket" / "dom"
    write_random_domain(bucket, 3, 32)
    cache = tmp_path / "cache"
    local = cache / "fake" / str(tmp_path).lstrip("/") / "bucket" / "dom"
    escaped = tmp_path / "outside" / "escaped.mds"
    ups = len(local.relative_to(tmp_path).parts)
    basename = str(escaped) if absolute else "../" * ups + "outside/escaped.mds"
    assert os.path.normpath(local / basename) == str(escaped)  # where today's join would write
    edit_index(bucket, lambda shards: shards[0]["raw_data"].update(basename=basename))
    with pytest.raises(DataError) as err:
        MdsDomain(f"fake://{bucket}", cache_dir=str(cache))[0]
    message = str(err.value)
    assert "index.json: shard basename" in message and basename in message, message
    assert not (tmp_path / "outside").exists()
    assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == ["index.json"]


def test_remote_domain_path_cannot_leave_the_cache(tmp_path, fake_remote):
    with pytest.raises(DataError, match=r"fake://x/\.\./\.\./\.\./y: the cache folder .* would leave"):
        MdsDomain("fake://x/../../../y", cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "y").exists()


# ---- item 3: only the encodings of our format are decoded ----------------------------------------

def test_pickle_column_is_never_unpickled(tmp_path):
    pwned = tmp_path / "pwned"
    columns = {"input_ids": "ndarray:uint32", "length": "int", "domain": "str", "extra": "pkl"}
    write_domain(str(tmp_path / "dom"), [{"input_ids": np.arange(1, 5, dtype=np.uint32), "length": 4, "domain": "d",
                                          "extra": Exploit(str(pwned))}], columns=columns)
    assert not pwned.exists()
    with pytest.raises(DataError) as err:
        MdsDomain(str(tmp_path / "dom"))[0]
    message = str(err.value)
    assert f"{tmp_path / 'dom' / 'index.json'}: shard shard.00000.mds: column 'extra' has encoding 'pkl'" in message
    assert not pwned.exists()


@pytest.mark.parametrize("encoding", ["json", "pil", "bytes"])
def test_other_encodings_are_refused(tmp_path, encoding):
    columns = {"input_ids": "ndarray:uint32", "length": "int", "domain": "str", "extra": "str"}
    write_domain(str(tmp_path / "dom"), [{"input_ids": np.arange(1, 5, dtype=np.uint32), "length": 4, "domain": "d",
                                          "extra": "x"}], columns=columns)
    def edit(shards):
        shards[0]["column_encodings"][shards[0]["column_names"].index("extra")] = encoding
    edit_index(tmp_path / "dom", edit)
    with pytest.raises(DataError, match=rf"column 'extra' has encoding '{encoding}'"):
        MdsDomain(str(tmp_path / "dom"))


def test_our_writers_encodings_are_accepted(tmp_path):
    samples = write_random_domain(tmp_path / "dom", 3, 32, with_mask=True)
    domain = MdsDomain(str(tmp_path / "dom"))
    np.testing.assert_array_equal(domain[2].mask, samples[2]["mask"])


# ---- item 8: the index agrees with the shards ----------------------------------------------------

def test_repeated_shard_entry_is_refused(tmp_path):
    write_random_domain(tmp_path / "dom", 3, 32)
    edit_index(tmp_path / "dom", lambda shards: shards.append(dict(shards[0], raw_data=dict(
        shards[0]["raw_data"], basename="./shard.00000.mds"))))
    with pytest.raises(DataError, match=r"dom/index.json: shard basename './shard.00000.mds' is listed twice"):
        MdsDomain(str(tmp_path / "dom"))


def test_index_claiming_fewer_samples_is_refused(tmp_path):
    write_random_domain(tmp_path / "dom", 3, 32)
    edit_index(tmp_path / "dom", lambda shards: shards[0].update(samples=2))
    domain = MdsDomain(str(tmp_path / "dom"))
    with pytest.raises(DataError, match=r"dom/shard.00000.mds: holds 3 samples but index.json lists 2"):
        domain[0]


def test_shard_size_disagreeing_with_index_is_refused(tmp_path):
    write_random_domain(tmp_path / "dom", 3, 32)
    shard = tmp_path / "dom" / "shard.00000.mds"
    size = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(DataError, match=rf"dom/shard.00000.mds: file has {size + 8} bytes but index.json lists {size}"):
        MdsDomain(str(tmp_path / "dom"))[0]


def write_hashed(folder, n=3):
    from streaming import MDSWriter

    from prolong_nemo.data.mds import PACKED_COLUMNS

    samples = [{"input_ids": np.arange(1, 9, dtype=np.uint32) + i, "indices": np.array([[0, 8]], np.uint32),
                "length": 8, "domain": "d"} for i in range(n)]
    with MDSWriter(out=str(folder), columns=PACKED_COLUMNS, hashes=["sha1", "xxh64"]) as writer:
        for s in samples:
            writer.write(s)
    return samples


def test_listed_hashes_are_verified(tmp_path):
    samples = write_hashed(tmp_path / "dom")
    np.testing.assert_array_equal(MdsDomain(str(tmp_path / "dom"))[1].input_ids, samples[1]["input_ids"])
    shard = tmp_path / "dom" / "shard.00000.mds"
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF  # a token of the last sample: same size, same sample count
    shard.write_bytes(bytes(data))
    domain = MdsDomain(str(tmp_path / "dom"))
    with pytest.raises(DataError, match=r"dom/shard.00000.mds: sha1 .* does not match index.json"):
        domain[0]


def test_shard_is_verified_once(tmp_path, monkeypatch):
    from prolong_nemo.data import mds

    write_hashed(tmp_path / "dom")
    calls = []
    original = mds.get_hash
    monkeypatch.setattr(mds, "get_hash", lambda algo, data: calls.append(algo) or original(algo, data))
    domain = MdsDomain(str(tmp_path / "dom"))
    for i in range(3):
        domain[i]
    assert sorted(calls) == ["sha1", "xxh64"]


# ---- item 9: one domain, two spellings -------------------------------------------------------------

@pytest.mark.parametrize("other", ["d/good/", "./d/good", "d/../d/good"])
def test_same_domain_spelled_twice_is_refused(tmp_path, other):
    with pytest.raises(DataError) as err:
        Mixture.parse({"d/good": 0.5, other: 0.5}, root=str(tmp_path))
    message = str(err.value)
    assert "d/good" in message and other in message and "same domain" in message, message


def test_same_domain_relative_and_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="same domain"):
        Mixture.parse(["d/good=1", f"{tmp_path}/d/good=1"])


def test_same_remote_domain_spelled_twice_is_refused():
    with pytest.raises(DataError, match="same domain"):
        Mixture.parse(["s3://bucket/d/good=1", "s3://bucket/d/good/=1"])
    assert len(Mixture.parse(["s3://bucket/d/good=1", "s3://bucket/d/good2=1"]).domains) == 2
