"""`prolong-nemo train` command line: parses, then dispatches.

- `prolong-nemo train <recipe> [hydra overrides]`: `training.train.train_recipe` (a backend
  picked by `--backend`: Megatron-Bridge under torchrun, or the CPU runner);
- `prolong-nemo train --preset llama3-tiny ...` (no recipe): `training.cpu.main.run_flags`, the
  CPU runner driven by flags, synthetic packed data.
"""

from __future__ import annotations

import argparse

# Flag-mode options default to None, i.e. TrainConfig's default (config_from_args): importing
# TrainConfig (training.cpu.runner) imports torch, which `prolong-nemo train --help` does not need.


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = "Train a recipe, or (without one) run the CPU runner on a small preset."
    parser.add_argument("recipe", nargs="?", default=None, help="recipe name (see prolong_nemo.recipes); omit for flag mode")
    parser.add_argument("overrides", nargs="*", help="recipe mode: Hydra overrides")
    parser.add_argument("--backend", choices=("auto", "bridge", "cpu"), default="auto", help="recipe mode only")
    parser.add_argument("--synthetic-data", action="store_true", help="recipe mode: synthetic rows instead of MDS")
    parser.add_argument("--preset", help="model preset (prolong_nemo.model.config.PRESETS)")
    parser.add_argument("--rope-theta", type=float, default=None, help="override the preset's rope_theta")
    parser.add_argument("--data", default="synthetic", help="'synthetic' (arithmetic documents) or a packed MDS directory")
    parser.add_argument("--row-tokens", type=int, default=256, help="synthetic data: tokens per packed row")
    parser.add_argument("--seq-length", type=int, help="longest packed row")
    parser.add_argument("--train-iters", type=int)
    parser.add_argument("--micro-batches", type=int, help="micro-batches per step (per DP rank)")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--min-lr", type=float)
    parser.add_argument("--warmup-iters", type=int)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--clip-grad", type=float)
    parser.add_argument("--loss-impl", choices=("chunked", "fused"))
    parser.add_argument("--chunk-tokens", type=int)
    parser.add_argument("--save", dest="save_dir", default=None, help="checkpoint root (resumes from it when present)")
    parser.add_argument("--save-interval", type=int)
    parser.add_argument("--exit-after", type=int, default=None,
                        help="stop after N steps (flag mode: without saving, a crash drill; recipe mode on the "
                             "CPU runner: saves first; refused with Megatron-Bridge)")
    parser.add_argument("--metrics-file", default=None, help="append one JSON line per step (full-precision loss)")
    parser.add_argument("--log-interval", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--cp", type=int, help="context parallel size (launch with torchrun --nproc-per-node)")
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    """Flag mode's TrainConfig: the options given, TrainConfig's defaults for the rest."""
    from prolong_nemo.training.cpu.runner import TrainConfig

    fields = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})


def run(args: argparse.Namespace) -> int:
    if args.recipe is not None:
        from prolong_nemo.training.train import train_recipe

        return train_recipe(args.recipe, args.overrides, backend=args.backend, exit_after=args.exit_after,
                            synthetic_data=args.synthetic_data)
    if args.overrides:
        raise SystemExit(f"overrides {args.overrides} need a recipe name first")
    from prolong_nemo.training.cpu.main import run_flags

    try:
        cfg = config_from_args(args)
    except ValueError as e:
        raise SystemExit(f"prolong-nemo train: {e}") from None
    return run_flags(cfg, data=args.data, row_tokens=args.row_tokens)
