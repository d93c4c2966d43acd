"""`prolong-nemo data inspect` against statistics computed directly from the written samples."""

import json

import numpy as np
import pytest

from prolong_nemo.cli import main
from prolong_nemo.data.packing import PackingConfig, padded_lengths

from data_fixtures import write_random_domain


def test_inspect_reports_exact_statistics(tmp_path, capsys):
    a = write_random_domain(tmp_path / "a", 12, 512, seed=1, max_docs=10)
    b = write_random_domain(tmp_path / "b", 5, 512, seed=2, max_docs=3, with_mask=True)
    png, report = tmp_path / "hist.png", tmp_path / "report.json"
    rc = main(["data", "inspect", f"{tmp_path}/a=3", f"{tmp_path}/b=1", "--cp-size", "4",
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
