"""`prolong-nemo train`: the CPU runner (real megatron-core steps on CPU, gloo).

The Megatron-Bridge entry for GPU clusters uses the same forward step
(`prolong_nemo.training.forward_step.make_forward_step`).
"""

from __future__ import annotations

import argparse

from prolong_nemo.training.cpu_runner import TrainConfig


def configure_parser(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    parser.description = "Train on CPU through megatron-core (small presets), with dist checkpoints and resume."
    parser.add_argument("--preset", default=d.preset, help="model preset (prolong_nemo.model.config.PRESETS)")
    parser.add_argument("--rope-theta", type=float, default=None, help="override the preset's rope_theta")
    parser.add_argument("--data", default="synthetic", help="'synthetic' (arithmetic documents) or a packed MDS directory")
    parser.add_argument("--row-tokens", type=int, default=256, help="synthetic data: tokens per packed row")
    parser.add_argument("--seq-length", type=int, default=d.seq_length, help="longest packed row")
    parser.add_argument("--train-iters", type=int, default=d.train_iters)
    parser.add_argument("--micro-batches", type=int, default=d.micro_batches, help="micro-batches per step (per DP rank)")
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--min-lr", type=float, default=d.min_lr)
    parser.add_argument("--warmup-iters", type=int, default=d.warmup_iters)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--clip-grad", type=float, default=d.clip_grad)
    parser.add_argument("--loss-impl", choices=("chunked", "fused"), default=d.loss_impl)
    parser.add_argument("--chunk-tokens", type=int, default=d.chunk_tokens)
    parser.add_argument("--save", dest="save_dir", default=None, help="checkpoint root (resumes from it when present)")
    parser.add_argument("--save-interval", type=int, default=d.save_interval)
    parser.add_argument("--exit-after", type=int, default=None, help="stop after N steps of this run without saving (crash drill)")
    parser.add_argument("--metrics-file", default=None, help="append one JSON line per step (full-precision loss)")
    parser.add_argument("--log-interval", type=int, default=d.log_interval)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--cp", type=int, default=d.cp, help="context parallel size (launch with torchrun --nproc-per-node)")
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})


def load_dataset(args: argparse.Namespace, cfg: TrainConfig):
    from prolong_nemo.model.config import preset

    if args.data == "synthetic":
        from prolong_nemo.training.synthetic import ArithmeticDocuments

        vocab = preset(cfg.preset).vocab_size
        return ArithmeticDocuments(vocab_size=vocab, row_tokens=args.row_tokens, seed=cfg.seed, cp_size=cfg.cp)
    raise SystemExit(
        f"--data {args.data!r}: only 'synthetic' is wired into the CPU runner so far; "
        "packed MDS rows come through prolong_nemo.data.dataset (any indexable of contract rows works "
        "with prolong_nemo.training.cpu_runner.train)"
    )


def run(args: argparse.Namespace) -> int:
    from prolong_nemo.data.dataset import collate
    from prolong_nemo.training.cpu_runner import train

    cfg = config_from_args(args)
    if args.data == "synthetic" and args.row_tokens > cfg.seq_length:
        raise SystemExit(f"--row-tokens {args.row_tokens} exceeds --seq-length {cfg.seq_length}")
    train(cfg, load_dataset(args, cfg), collate, log=lambda line: print(line, flush=True))
    return 0
