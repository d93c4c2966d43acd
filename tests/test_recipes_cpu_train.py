"""The CPU fallback of `prolong-nemo train`: each stage's miniature trains end to end on MDS data
through the data adapter, chained like the real stages (64K -> 512K with Adam state and a
restarted schedule -> SFT from weights only) from a converted Hugging Face checkpoint, and a
killed stage resumes where it stopped.

Runs in one subprocess: the CPU runner initializes a gloo process group and megatron's
parallel state, which must not leak into other tests.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from prolong_nemo.training.cpu.main import apply_start, run_cpu
    from prolong_nemo.training.train import train_recipe
    from prolong_nemo.training.start import resolve_start
    from prolong_nemo.recipes.stages import load_recipe
    from prolong_nemo.training.cpu import runner as cpu_runner

    logs = []
    def adam_steps(state):
        return sorted({int(s["step"]) for s in state.optimizer.state.values()})

    out = {}
    # stage 1 starts from a Hugging Face Llama converted by prolong_nemo.convert
    from transformers import LlamaConfig, LlamaForCausalLM
    from prolong_nemo.convert import hf_to_megatron
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=224, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                      rope_theta=500000.0, max_position_embeddings=4096, tie_word_embeddings=False))
    hf.save_pretrained("hf", safe_serialization=True)
    hf_to_megatron("hf", "converted", rope_theta=8e6, max_position_embeddings=65536, show_progress=False)
    init = ["checkpoint.init=weights", "checkpoint.init_from=converted"]
    r64 = load_recipe("stage_64k_cpu", init)
    cpu_runner.init_distributed(seed=r64.train.seed)
    probe = cpu_runner.build_state(cpu_runner.TrainConfig(preset="llama3-tiny", seq_length=512))
    apply_start(resolve_start(r64), probe, r64, logs.append)
    out["64k_init_equals_hf"] = (torch.equal(probe.model.embedding.word_embeddings.weight, hf.model.embed_tokens.weight)
                                 and torch.equal(probe.model.output_layer.weight, hf.lm_head.weight))
    logs.clear()
    # `prolong-nemo train stage_64k --backend cpu`: the CPU miniature, asked for
    assert train_recipe("stage_64k", init, backend="cpu", log=logs.append) == 0
    out["log_64k"] = list(logs); logs.clear()

    # stage 512K, killed after 2 of 4 steps, then resubmitted
    r512 = load_recipe("stage_512k_cpu")
    s2a = run_cpu(r512, log=logs.append, exit_after=2)
    out["log_512k_a"] = list(logs); logs.clear()
    out["s2a"] = dict(step=s2a.step, consumed=s2a.consumed_samples, adam=adam_steps(s2a),
                      lr=s2a.optimizer.param_groups[0]["lr"])
    s2 = run_cpu(r512, log=logs.append)
    out["log_512k_b"] = list(logs); logs.clear()
    out["s2"] = dict(step=s2.step, consumed=s2.consumed_samples, adam=adam_steps(s2),
                     lr=s2.optimizer.param_groups[0]["lr"])
    final_512k = {k: v.detach().clone() for k, v in s2.model.state_dict().items() if torch.is_tensor(v)}

    # SFT starts from the weights of stage 512K only
    rsft = load_recipe("sft_cpu")
    probe = cpu_runner.build_state(cpu_runner.TrainConfig(preset="llama3-tiny", seq_length=512))
    apply_start(resolve_start(rsft), probe, rsft, logs.append)
    same = all(torch.equal(final_512k[k], v) for k, v in probe.model.state_dict().items()
               if torch.is_tensor(v) and k in final_512k)
    out["sft_weights_equal_512k"] = same
    out["sft_probe_adam_state"] = len(probe.optimizer.state)
    logs.clear()
    s3 = run_cpu(rsft, log=logs.append)
    out["log_sft"] = list(logs)
    out["s3"] = dict(step=s3.step, adam=adam_steps(s3), lr=s3.optimizer.param_groups[0]["lr"],
                     losses=[h.loss for h in s3.history])
    print(json.dumps(out))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_domain(folder: Path, n: int, length: int, vocab: int, seed: int, with_mask: bool = False) -> None:
    from prolong_nemo.data.mds import write_domain as write

    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        cuts = np.sort(rng.choice(np.arange(8, length - 8), size=3, replace=False))
        bounds = np.concatenate([[0], cuts, [length]])
        sample = {"input_ids": rng.integers(1, vocab, length).astype(np.uint32),
                  "indices": np.stack([bounds[:-1], bounds[1:]], axis=1).astype(np.uint32),
                  "length": length, "domain": folder.name}
        if with_mask:
            sample["mask"] = (rng.random(length) < 0.5).astype(np.uint8)
        samples.append(sample)
    write(str(folder), samples, with_mask=with_mask)


def test_cpu_fallback_trains_and_chains_all_stages(tmp_path):
    data, runs = tmp_path / "data", tmp_path / "runs"
    vocab = 512  # llama3-tiny
    for sub, length in (("64k", 512), ("512k", 4096)):
        write_domain(data / sub / "long", 4, length, vocab, seed=1)
        write_domain(data / sub / "short", 4, length, vocab, seed=2)
    write_domain(data / "sft" / "chat", 4, 512, vocab, seed=3, with_mask=True)
    # A fresh single-process gloo world: nothing inherited from tests that ran torch.distributed here.
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(PROLONG_DATA_CPU=str(data), PROLONG_RUNS=str(runs), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    log = out["log_64k"]
    assert log[0] == "[prolong] CPU backend: training stage_64k_cpu, the CPU miniature of stage_64k"
    assert log[1] == "[prolong] starting from the weights of converted"
    assert out["64k_init_equals_hf"] is True
    steps = [line for line in log if "| lm loss" in line]
    assert len(steps) == 4 and steps[-1].startswith("[prolong] step 4/4 (100.0%)")
    for field in ("tokens/s", "model TFLOP/s/GPU", "mem", "ETA", "lr 1.000e-06"):
        assert field in steps[-1]  # min LR = 10% of 1e-5 at the end of the cosine
    assert (runs / "stage_64k_cpu" / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "4"

    # 512K: stage 1's Adam state continues (per-parameter step 4 + 2), schedule restarted
    first = out["log_512k_a"]
    assert f"loaded {runs}/stage_64k_cpu/checkpoints at its step 4" in first[0]
    assert "lr 5.000e-06" in next(line for line in first if line.startswith("[prolong] step 1/4"))
    assert out["s2a"] == dict(step=2, consumed=4, adam=[6], lr=out["s2a"]["lr"])
    second = out["log_512k_b"]
    assert second[0] == f"[prolong] resuming from {runs}/stage_512k_cpu/checkpoints at step 2"
    assert [line.split(" |")[0] for line in second if "| lm loss" in line] == \
        ["[prolong] step 3/4 (75.0%)", "[prolong] step 4/4 (100.0%)"]
    assert out["s2"]["step"] == 4 and out["s2"]["consumed"] == 8 and out["s2"]["adam"] == [8]
    assert abs(out["s2"]["lr"] - 5e-7) < 1e-15

    # SFT: the 512K weights, a fresh optimizer
    assert out["sft_weights_equal_512k"] is True and out["sft_probe_adam_state"] == 0
    assert f"starting from the weights of {runs}/stage_512k_cpu/checkpoints" in out["log_sft"][0]
    assert out["s3"]["step"] == 4 and out["s3"]["adam"] == [4]
    assert abs(out["s3"]["lr"] - 2e-6) < 1e-15
    assert all(np.isfinite(out["s3"]["losses"]))
