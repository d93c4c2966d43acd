"""`prolong-nemo data inspect` against statistics computed directly from the written samples."""

import json
import os

import numpy as np
import pytest

from prolong_nemo.cli import main
from prolong_nemo.data.packing import PackingConfig, padded_lengths

from data_fixtures import write_random_domain


def test_inspect_reports_exact_statistics(tmp_path, capsys):
    a = write_random_domain(tmp_path / "a", 12, 512, seed=1, max_docs=10)
    b = write_random_domain(tmp_path / "b", 5, 512, seed=2, max_docs=3, with_mask=True)
    png, report = tmp_path / "hist.png", tmp_path / "report.json"
    rc = main(["data", "inspect", f"{tmp_path}/a=0.75", f"{tmp_path}/b=0.25", "--cp-size", "4",
               "--train-samples", "100", "--png", str(png), "--json", str(report)])
    assert rc == 0
    out = json.loads(report.read_text())
    for samples, got in zip((a, b), out["domains"]):
        lengths = np.concatenate([np.diff(s["indices"].astype(np.int64), axis=1)[:, 0] for s in samples])
        kept = lengths[lengths > 1]
        assert got["samples"] == len(samples) and got["tokens"] == 512 * len(samples)
        assert got["documents"] == len(lengths)
        assert got["doc_length_percentiles"]["p50"] == int(np.percentile(kept, 50))
        assert got["doc_length_percentiles"]["p100"] == kept.max()
        per_sample = [np.diff(s["indices"].astype(np.int64), axis=1)[:, 0] for s in samples]
        padded = sum(int(padded_lengths(d[d > 1], PackingConfig(cp_size=4)).sum()) for d in per_sample)
        assert got["padding"] == padded - kept.sum()
    # with masks, a target is a next token inside its document whose mask is 1
    expected_b = sum(int(s["mask"][st + 1:en].sum()) for s in b for st, en in s["indices"].astype(int) if en - st > 1)
    assert out["domains"][1]["targets"] == expected_b
    eff = out["effective_mixture"]
    assert eff[0]["sample_share"] == pytest.approx(0.75) and eff[1]["epochs"] == pytest.approx(25 / 5)
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "CP padding at cp_size=4" in capsys.readouterr().out


def test_inspect_names_bad_sample(tmp_path, capsys):
    from prolong_nemo.data.mds import write_domain

    write_domain(str(tmp_path / "d"), [{"input_ids": np.arange(4, dtype=np.uint32), "length": 5, "domain": "d",
                                        "indices": np.array([[0, 4]], np.uint32)}])
    assert main(["data", "inspect", str(tmp_path / "d"), "--png", str(tmp_path / "x.png")]) == 2
    assert "d/shard.00000.mds: sample 0 (domain sample 0): length 5 disagrees" in capsys.readouterr().err


def test_inspect_reports_and_warns_about_tokens_no_document_covers(tmp_path, capsys):
    """Indices covering 22 of 512 tokens: the other 490 are never trained; say so (issue 13, item 10)."""
    from prolong_nemo.data.mds import write_domain
    from prolong_nemo.data.packing import UNCOVERED_WARN_SHARE, uncovered_tokens

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, 512).astype(np.uint32)
    partial = [{"input_ids": ids, "indices": np.array([[0, 10], [100, 112]], dtype=np.uint32),
                "length": 512, "domain": "p"}] * 2 + [{"input_ids": ids, "indices": np.array([[0, 300], [300, 512]],
                                                                                           dtype=np.uint32),
                                                       "length": 512, "domain": "p"}]
    write_domain(str(tmp_path / "partial"), partial)
    assert uncovered_tokens(512, None) == 0 and uncovered_tokens(512, np.zeros((0, 2), np.uint32)) == 0
    write_random_domain(tmp_path / "full", 4, 512, seed=3)
    report = tmp_path / "report.json"
    rc = main(["data", "inspect", str(tmp_path / "partial"), str(tmp_path / "full"), "--png",
               str(tmp_path / "h.png"), "--json", str(report)])
    assert rc == 0
    got = json.loads(report.read_text())["domains"]
    assert got[0]["uncovered_tokens"] == 2 * 490 and got[0]["uncovered_share"] == pytest.approx(980 / 1536)
    assert got[1]["uncovered_tokens"] == 0 and got[1]["uncovered_share"] == 0
    out = capsys.readouterr().out
    assert UNCOVERED_WARN_SHARE == 0.01
    assert (f"warning: partial: 980 of 1536 tokens (63.80%) are in no document (indices) and are never "
            f"trained (above {100 * UNCOVERED_WARN_SHARE:g}%)") in out
    assert "warning: full" not in out


def test_training_dataset_warns_about_uncovered_tokens_at_build_time(tmp_path, caplog):
    import logging

    from prolong_nemo.data.dataset import build_datasets, dataset_config
    from prolong_nemo.data.mds import write_domain
    from prolong_nemo.data.mixture import Mixture

    ids = np.arange(1, 513, dtype=np.uint32)
    write_domain(str(tmp_path / "partial"), [{"input_ids": ids, "indices": np.array([[0, 22]], dtype=np.uint32),
                                              "length": 512, "domain": "p"}] * 4)
    write_random_domain(tmp_path / "full", 4, 512, seed=3)
    mixture = Mixture.parse({str(tmp_path / "partial"): 0.5, str(tmp_path / "full"): 0.5})
    with caplog.at_level(logging.INFO, logger="prolong_nemo.data.dataset"):
        build_datasets(dataset_config(mixture, sequence_length=512), [8, 0, 0])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"{tmp_path / 'partial'}: 1960 of 2048 tokens (95.70%) in the 4 samples checked are in no "
               "document" in w for w in warnings), warnings
    assert not any("full" in w for w in warnings)


def test_inspect_refuses_a_signed_mask(tmp_path, capsys):
    """An int8 -1 mask would be a loss weight of -1 (gradient ascent): refused when read (issue 13, item 7)."""
    from prolong_nemo.data.mds import PACKED_COLUMNS, write_domain

    ids = np.arange(1, 17, dtype=np.uint32)
    sample = {"input_ids": ids, "indices": np.array([[0, 16]], np.uint32), "length": 16, "domain": "chat"}
    write_domain(str(tmp_path / "chat"), [dict(sample, mask=np.array([0, 1, -1, 1] * 4, np.int8))],
                 columns=dict(PACKED_COLUMNS, mask="ndarray:int8"))
    assert main(["data", "inspect", str(tmp_path / "chat"), "--png", str(tmp_path / "h.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"error: {tmp_path / 'chat'}: sample 0: mask must be unsigned integers (target = mask != 0), "
                   "got int8")


# ---- issue 10: remote domains need --cache-dir; one proportion rule with `plan` ------------------

def test_inspect_remote_domain_needs_a_cache_dir(tmp_path, capsys, monkeypatch):
    """A remote domain (s3://, gs://, hf:// ...) is downloaded by mosaicml-streaming into a local
    folder: without --cache-dir one line names the domain and the option, before anything is read;
    with it, the index and shards land below the cache and are read from there."""
    import shutil

    from prolong_nemo.data import mds

    samples = write_random_domain(tmp_path / "bucket" / "book", 3, 64, seed=4)
    fetched = []

    class FakeS3:  # no network: s3://bucket/... served from tmp_path/bucket/...
        @staticmethod
        def get(remote):
            return FakeS3()

        def download(self, remote, local, timeout):
            fetched.append((remote, local))
            shutil.copyfile(tmp_path / remote.removeprefix("s3://"), local)

    monkeypatch.setattr(mds, "CloudDownloader", FakeS3)
    local = write_random_domain(tmp_path / "local", 2, 64, seed=5)
    png, report = tmp_path / "h.png", tmp_path / "r.json"
    args = ["data", "inspect", f"{tmp_path / 'local'}=0.5", "s3://bucket/book/=0.5", "--png", str(png),
            "--json", str(report)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == ("error: s3://bucket/book/: a remote domain: pass --cache-dir DIR (the local folder "
                   "mosaicml-streaming downloads its index.json and shards to)\n")
    assert not fetched and not png.exists()

    cache = tmp_path / "cache"
    assert main(args + ["--cache-dir", str(cache)]) == 0
    into = cache / "s3" / "bucket" / "book"
    assert fetched == [("s3://bucket/book/index.json", f"{into / 'index.json'}.tmp.{os.getpid()}"),
                       ("s3://bucket/book/shard.00000.mds", f"{into / 'shard.00000.mds'}.tmp.{os.getpid()}")]
    assert sorted(p.name for p in into.iterdir()) == ["index.json", "shard.00000.mds"]
    got = json.loads(report.read_text())["domains"]
    assert [d["samples"] for d in got] == [len(local), len(samples)]
    assert got[1]["documents"] == sum(len(s["indices"]) for s in samples)


def test_inspect_refuses_proportions_plan_refuses(tmp_path, capsys):
    """`plan` refuses a data.mixture whose proportions do not sum to 1; `inspect` used to normalise
    them (3:1 read as 0.75/0.25). One rule now (Mixture.checked): refused, naming the file."""
    import yaml

    from prolong_nemo.data.mixture import PROPORTION_SUM_TOLERANCE, Mixture
    from prolong_nemo.errors import DataError

    write_random_domain(tmp_path / "a", 2, 64, seed=1)
    write_random_domain(tmp_path / "b", 2, 64, seed=2)
    mix = tmp_path / "mix.yaml"
    mix.write_text(yaml.safe_dump({"mixture": {"a": 3, "b": 1}}))
    png = tmp_path / "h.png"
    assert main(["data", "inspect", str(mix), "--root", str(tmp_path), "--png", str(png)]) == 2
    assert capsys.readouterr().err == (f"error: {mix}: mixture proportions sum to 4, not 1 (a=3, b=1): give each "
                                       "domain its share of the samples drawn, the shares summing to 1 (nothing "
                                       "is normalised)\n")
    assert main(["data", "inspect", f"{tmp_path}/a=0.6", f"{tmp_path}/b=0.3", "--png", str(png)]) == 2
    assert capsys.readouterr().err.startswith("error: mixture proportions sum to 0.9, not 1 (a=0.6, b=0.3): ")
    assert not png.exists()
    # the tolerance plan allows (rounded shares), and bare folders (equal shares) pass
    assert PROPORTION_SUM_TOLERANCE == 1e-6
    assert [d.proportion for d in Mixture.checked([f"{tmp_path}/a=0.3333333", f"{tmp_path}/b=0.6666667"]).domains] \
        == [0.3333333, 0.6666667]
    assert [d.proportion for d in Mixture.checked([str(tmp_path / "a"), str(tmp_path / "b")]).domains] == [0.5, 0.5]
    with pytest.raises(DataError, match=r"^data.mixture proportions sum to 1.00001, not 1 \(a=0.50001, b=0.5\)"):
        Mixture.checked({"a": 0.50001, "b": 0.5}, what="data.mixture")
    mix.write_text(yaml.safe_dump({"mixture": {"a": 0.75, "b": 0.25}}))
    assert main(["data", "inspect", str(mix), "--root", str(tmp_path), "--png", str(png), "--json",
                 str(tmp_path / "r.json")]) == 0
    shares = [d["proportion"] for d in json.loads((tmp_path / "r.json").read_text())["domains"]]
    assert shares == [0.75, 0.25]
