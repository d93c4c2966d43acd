"""A shortened `prolong-nemo demo`, end to end in a fresh process, as a newcomer runs it."""

import json
import os
import subprocess
import sys

import pytest
from safetensors import safe_open


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cmd = [sys.executable, "-m", "prolong_nemo.cli", "demo", "--out", str(out), "--steps", "8", "--sft-steps", "2",
           "--chars-per-domain", "40000", "--pack-length", "512"]
    # a fresh process as from a shell: no rendezvous variables other tests may have set
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout


def test_demo_trains_and_converts(demo):
    out, stdout = demo
    report = json.loads((out / "report.json").read_text())
    for name in ("code", "prose", "chat"):
        data = report["data"][name]
        # packing never invents tokens (BOS/EOS add at most 2 per document)
        assert 4 <= data["packed_samples"] and data["packed_samples"] * 512 <= data["tokens"] + 2 * data["documents"]
    stage1 = report["stages"]["stage 64K (scaled down)"]
    assert [h["step"] for h in stage1] == list(range(1, 9))
    assert stage1[0]["loss"] == pytest.approx(11.76, abs=0.3)  # ln(128256): a random start
    assert stage1[-1]["loss"] < stage1[0]["loss"] - 0.5  # learning, not noise
    assert len(report["stages"]["SFT"]) == 2
    assert report["conversion"]["megatron_to_hf"]["max_abs_logit_diff"] <= 1e-5
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "transformers vs Megatron max |logit diff|" in (out / "report.md").read_text()


def test_demo_export_carries_the_trained_rope_theta(demo):
    """The HF start had rope_theta 5e5, stage 64K 8e6, SFT (after 512K) 1.28e8: the export says 1.28e8."""
    out, _ = demo
    init = json.loads((out / "hf_init" / "config.json").read_text())
    final = json.loads((out / "hf_final" / "config.json").read_text())
    theta = lambda c: c.get("rope_theta") or c["rope_parameters"]["rope_theta"]  # noqa: E731
    assert theta(init) == 500_000 and theta(final) == 128_000_000
    assert final["max_position_embeddings"] >= 512
    # the Instruct-style stop ids of the start model survive two training stages into the export
    assert init["eos_token_id"] == final["eos_token_id"] == [128001, 128009]
    names = set()
    for shard in (out / "hf_final").glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            names |= set(f.keys())
    assert "lm_head.weight" in names and "model.layers.3.mlp.down_proj.weight" in names
