"""The end-to-end demo: ProLong's pipeline in miniature on a CPU, with no downloads.

1. a small real corpus from text every Python install has (prose: the stdlib's docs and
   docstrings; code: its sources; chat: Q&A dialogues built from docstrings);
2. tokenized with the real Llama-3 tokenizer, packed into ProLong-format MDS domains
   ("long" = code, "short" = prose, mixed 60/40 as ProLong mixes long and short data; chat with
   assistant masks for SFT);
3. a random Llama-3-architecture Hugging Face model (standing in for Llama-3-8B-Instruct)
   converted to a Megatron checkpoint with the 64K stage's rope_theta;
4. stage "64K" through the recipe code path scaled down (document masking, the domain
   mixture, per-token loss, chunked cross-entropy), then SFT from its weights on chat data;
5. the final Megatron checkpoint exported to Hugging Face, and transformers checked to
   reproduce the Megatron logits;
6. a report (report.md, report.json) and a PNG of the loss curve.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from prolong_nemo.model.config import ROPE_THETA_64K, preset


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("runs/demo")
    chars_per_domain: int = 300_000  # about 75K Llama-3 tokens per pretraining domain
    dialogues: int = 200
    pack_length: int = 1024  # the 64K recipe's packing, scaled down
    preset: str = "llama3-demo"
    steps: int = 60
    sft_steps: int = 12
    global_batch: int = 2  # packed sequences per step
    lr: float = 3e-3  # a 4-layer model learns at a far higher LR than Llama-3-8B's 1e-5
    sft_lr: float = 1e-3
    seed: int = 0


@dataclass
class DemoReport:
    config: dict
    data: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)
    conversion: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)


class Timer:
    def __init__(self, report: DemoReport, log: Callable[[str], None]):
        self.report, self.log = report, log

    def __call__(self, name: str, fn: Callable, *args, **kwargs):
        self.log(f"\n=== {name} ===")
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.report.seconds[name] = round(time.perf_counter() - start, 1)
        return result


# ---- data ----------------------------------------------------------------------------------


def prepare_data(cfg: DemoConfig, report: DemoReport, log: Callable[[str], None]) -> dict[str, Path]:
    from prolong_nemo.data.corpus import build_corpus
    from prolong_nemo.data.packer import LLAMA3_BOS_ID, LLAMA3_EOS_ID, PackOptions, pack_mds
    from prolong_nemo.data.tokenize import TokenizeOptions, tokenize_files

    corpus = build_corpus(cfg.out / "corpus", max_chars_per_domain=cfg.chars_per_domain, max_dialogues=cfg.dialogues)
    roots = {"pretrain": cfg.out / "data" / "pretrain", "sft": cfg.out / "data" / "sft"}
    # (corpus file, raw folder, packed folder, BOS/EOS around documents: chat already has BOS)
    plan = [(corpus.code, "code", roots["pretrain"] / "long", True),
            (corpus.prose, "prose", roots["pretrain"] / "short", True),
            (corpus.chat, "chat", roots["sft"] / "chat", False)]
    for source, name, packed, add_special in plan:
        raw = cfg.out / "raw" / name
        tok = tokenize_files([source], raw, TokenizeOptions(domain=name), overwrite=True, progress=False)
        options = PackOptions(pack_length=cfg.pack_length, min_length=64, domain=name,
                              bos_id=LLAMA3_BOS_ID if add_special else None,
                              eos_id=LLAMA3_EOS_ID if add_special else None)
        stats = pack_mds([raw], packed, options, overwrite=True, progress=False)
        log(f"{name}: {tok.documents_out} documents, {tok.tokens_out} tokens -> "
            f"{sum(stats.samples_out.values())} packed samples of {cfg.pack_length} in {packed}")
        report.data[name] = {"documents": tok.documents_out, "tokens": tok.tokens_out,
                             "packed_samples": sum(stats.samples_out.values()), "folder": str(packed)}
    return roots


# ---- model start ---------------------------------------------------------------------------


def initial_checkpoint(cfg: DemoConfig, report: DemoReport) -> Path:
    """A random Llama-3-architecture HF model, converted the way stage 64K starts from Llama-3."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from prolong_nemo.convert import hf_to_megatron
    from prolong_nemo.convert.hf_config import HfExtras, hf_config_dict

    arch = preset(cfg.preset)
    torch.manual_seed(cfg.seed)
    hf_dir = cfg.out / "hf_init"
    # Llama-3-8B-Instruct's ids: generation stops on <|eot_id|> (128009) as well as 128001
    model = LlamaForCausalLM(LlamaConfig(**hf_config_dict(arch, HfExtras(eos_token_id=[128001, 128009]))))
    model.save_pretrained(hf_dir, safe_serialization=True)
    result = hf_to_megatron(hf_dir, cfg.out / "megatron_init", rope_theta=ROPE_THETA_64K,
                            max_position_embeddings=cfg.pack_length, overwrite=True, show_progress=False)
    report.conversion["hf_to_megatron"] = {"tensors": result.tensors, "seconds": round(result.seconds, 2),
                                           "rope_theta": result.arch.rope_theta}
    return result.output


# ---- training ------------------------------------------------------------------------------


def train_stage(recipe_name: str, overrides: list[str], log: Callable[[str], None]) -> list[dict]:
    from prolong_nemo.recipes.stages import load_recipe
    from prolong_nemo.training.cpu.main import run_cpu

    recipe = load_recipe(recipe_name, overrides)
    log(f"recipe {recipe_name}: {' '.join(overrides)}")
    state = run_cpu(recipe, log=log)
    return [asdict(r) for r in state.history]


def stage_overrides(cfg: DemoConfig, *, root: Path, steps: int, lr: float, ckpt: Path, init_from: Path,
                    init: str) -> list[str]:
    return [f"model.preset={cfg.preset}", f"data.root={root}", f"data.sequence_length={cfg.pack_length}",
            f"data.seed={cfg.seed}", f"train.steps={steps}", f"train.global_batch_size={cfg.global_batch}",
            f"optim.lr={lr}", f"checkpoint.dir={ckpt}", f"checkpoint.save_interval={steps}",
            f"checkpoint.init={init}", f"checkpoint.init_from={init_from}", "logging.log_interval=5"]


# ---- export --------------------------------------------------------------------------------


def export_and_verify(cfg: DemoConfig, ckpt: Path, report: DemoReport, log: Callable[[str], None]) -> float:
    import torch

    from prolong_nemo.convert import megatron_to_hf, verify
    from prolong_nemo.data.tokenize import encode_text, get_tokenizer

    result = megatron_to_hf(ckpt, cfg.out / "hf_final", overwrite=True, show_progress=False)
    prompt = "ProLong trains Llama-3 to read half a million tokens at once."
    tokens = torch.tensor([[128000, *encode_text(get_tokenizer(), prompt)]])
    check = verify(result.output, ckpt, tokens)
    log(f"exported {result.tensors} tensors to {result.output}; max |logit diff| transformers vs Megatron "
        f"on a {check.tokens}-token prompt: {check.max_abs_logit_diff:.2e}")
    report.conversion["megatron_to_hf"] = {"folder": str(result.output), "tensors": result.tensors,
                                           "seconds": round(result.seconds, 2), "rope_theta": result.arch.rope_theta,
                                           "max_abs_logit_diff": check.max_abs_logit_diff}
    return check.max_abs_logit_diff


# ---- report --------------------------------------------------------------------------------


def plot_losses(stages: dict[str, list[dict]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    offset = 0
    for name, history in stages.items():
        steps = [offset + h["step"] for h in history]
        ax.plot(steps, [h["loss"] for h in history], marker=".", label=name)
        offset = steps[-1] if steps else offset
    ax.set(xlabel="optimizer step", ylabel="lm loss (per-token mean)", title="prolong-nemo demo")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_report(cfg: DemoConfig, report: DemoReport) -> str:
    lines = ["# prolong-nemo demo", ""]
    for name, d in report.data.items():
        lines.append(f"- data {name}: {d['documents']} documents, {d['tokens']} tokens, "
                     f"{d['packed_samples']} packed samples of {cfg.pack_length} tokens")
    for name, history in report.stages.items():
        first, last = history[0]["loss"], history[-1]["loss"]
        tps = sum(h["tokens"] for h in history) / max(sum(h["seconds"] for h in history), 1e-9)
        lines.append(f"- {name}: {len(history)} steps, loss {first:.3f} -> {last:.3f}, {tps:,.0f} tokens/s")
    conv = report.conversion.get("megatron_to_hf", {})
    if conv:
        lines.append(f"- export: {conv['tensors']} tensors -> {conv['folder']} (rope_theta {conv['rope_theta']:g}); "
                     f"transformers vs Megatron max |logit diff| {conv['max_abs_logit_diff']:.2e}")
    lines.append("- time: " + ", ".join(f"{k} {v:.0f}s" for k, v in report.seconds.items()))
    lines.append(f"- loss curve: {cfg.out / 'loss.png'}")
    text = "\n".join(lines) + "\n"
    (cfg.out / "report.md").write_text(text)
    (cfg.out / "report.json").write_text(json.dumps(asdict(report), indent=2, default=str))
    return text


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> DemoReport:
    cfg.out.mkdir(parents=True, exist_ok=True)
    # Each demo trains from its start: checkpoints of an earlier demo would be resumed instead.
    shutil.rmtree(cfg.out / "runs", ignore_errors=True)
    report = DemoReport(config={k: str(v) for k, v in asdict(cfg).items()})
    step = Timer(report, log)
    roots = step("data: corpus, tokenize, pack", prepare_data, cfg, report, log)
    init = step("convert: HF -> Megatron (stage 64K start)", initial_checkpoint, cfg, report)
    stage1_ckpt = cfg.out / "runs" / "stage_64k" / "checkpoints"
    report.stages["stage 64K (scaled down)"] = step(
        "train: stage 64K recipe (CPU miniature)", train_stage, "stage_64k_cpu",
        stage_overrides(cfg, root=roots["pretrain"], steps=cfg.steps, lr=cfg.lr, ckpt=stage1_ckpt,
                        init_from=init, init="weights"), log)
    sft_ckpt = cfg.out / "runs" / "sft" / "checkpoints"
    report.stages["SFT"] = step(
        "train: SFT recipe from stage 64K weights", train_stage, "sft_cpu",
        stage_overrides(cfg, root=roots["sft"], steps=cfg.sft_steps, lr=cfg.sft_lr, ckpt=sft_ckpt,
                        init_from=stage1_ckpt, init="weights"), log)
    step("convert: Megatron -> HF, verify with transformers", export_and_verify, cfg, sft_ckpt, report, log)
    plot_losses(report.stages, cfg.out / "loss.png")
    log("\n" + write_report(cfg, report))
    return report


def configure_parser(parser: argparse.ArgumentParser) -> None:
    defaults = DemoConfig()
    parser.add_argument("--out", type=Path, default=defaults.out, help="everything the demo writes goes here")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="stage 64K optimizer steps")
    parser.add_argument("--sft-steps", type=int, default=defaults.sft_steps)
    parser.add_argument("--pack-length", type=int, default=defaults.pack_length)
    parser.add_argument("--chars-per-domain", type=int, default=defaults.chars_per_domain)
    parser.add_argument("--preset", default=defaults.preset)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = DemoConfig(out=args.out, steps=args.steps, sft_steps=args.sft_steps, pack_length=args.pack_length,
                     chars_per_domain=args.chars_per_domain, preset=args.preset)
    run_demo(cfg)
    return 0
