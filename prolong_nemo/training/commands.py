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
    parser.add_argument("--backend", choices=("auto", "bridge", "cpu"), default=None,
                        help="recipe mode: auto (default; Megatron-Bridge where it runs, else refuses a full-size "
                             "recipe), bridge, or cpu (the CPU runner; a full-size recipe's CPU miniature)")
    parser.add_argument("--cfg", choices=("job",), default=None,
                        help="recipe mode: print the composed recipe and the Megatron-Bridge ConfigContainer it "
                             "builds (flattened), then exit without training (Hydra's --cfg job)")
    parser.add_argument("--synthetic-data", action="store_true", help="recipe mode: synthetic rows instead of MDS")
    parser.add_argument("--preset", help="model preset (prolong_nemo.model.config.PRESETS)")
    parser.add_argument("--rope-theta", type=float, default=None, help="override the preset's rope_theta")
    parser.add_argument("--data", default=None,
                        help="flag mode: 'synthetic' (arithmetic documents, the default) or a folder of packed "
                             "ProLong MDS samples (input_ids + indices), read through the data adapter")
    parser.add_argument("--row-tokens", type=int, default=None, help="synthetic data: tokens per packed row (256)")
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


# Flag-mode options and the recipe key that sets the same thing (recipe mode refuses the flag
# and names the key: a flag that silently did nothing there trained something else).
RECIPE_KEY_OF_FLAG = {
    "preset": ("--preset", "model.preset"), "rope_theta": ("--rope-theta", "model.rope_theta"),
    "data": ("--data", "data.root / data.mixture"), "row_tokens": ("--row-tokens", "--synthetic-data"),
    "seq_length": ("--seq-length", "data.sequence_length"), "train_iters": ("--train-iters", "train.steps"),
    "micro_batches": ("--micro-batches", "train.global_batch_size"), "lr": ("--lr", "optim.lr"),
    "min_lr": ("--min-lr", "optim.min_lr_ratio"), "warmup_iters": ("--warmup-iters", "optim.warmup_fraction"),
    "weight_decay": ("--weight-decay", "optim.weight_decay"), "clip_grad": ("--clip-grad", "optim.clip_grad"),
    "loss_impl": ("--loss-impl", "loss.impl"), "chunk_tokens": ("--chunk-tokens", "loss.chunk_tokens"),
    "save_dir": ("--save", "checkpoint.dir"), "save_interval": ("--save-interval", "checkpoint.save_interval"),
    "metrics_file": ("--metrics-file", "logging.tensorboard_dir (metrics.jsonl there)"),
    "log_interval": ("--log-interval", "logging.log_interval"), "seed": ("--seed", "train.seed"),
    "cp": ("--cp", "parallel.cp"),
}
RECIPE_MODE_ONLY = {"backend": "--backend", "cfg": "--cfg", "synthetic_data": "--synthetic-data"}


def flags_that_do_not_apply(args: argparse.Namespace) -> str | None:
    given = lambda dest: getattr(args, dest) not in (None, False)  # noqa: E731
    if args.recipe is not None:
        wrong = [f"{flag} (the recipe's {key})" for dest, (flag, key) in RECIPE_KEY_OF_FLAG.items() if given(dest)]
        if wrong:
            return (f"{', '.join(wrong)}: flag-mode options, which a recipe does not read; set the recipe key "
                    f"as a Hydra override instead, e.g. `prolong-nemo train {args.recipe} optim.lr=2e-5`")
    else:
        wrong = [flag for dest, flag in RECIPE_MODE_ONLY.items() if given(dest)]
        if wrong:
            return f"{', '.join(wrong)}: recipe-mode options; name a recipe first (prolong-nemo train <recipe> ...)"
    return None


def run(args: argparse.Namespace) -> int:
    from prolong_nemo.recipes.config import RecipeError

    problem = flags_that_do_not_apply(args)
    if problem:
        raise RecipeError(problem)
    if args.recipe is not None:
        if args.cfg == "job":
            from prolong_nemo.training.train import print_job_config

            return print_job_config(args.recipe, args.overrides, backend=args.backend or "auto")
        from prolong_nemo.training.train import train_recipe

        return train_recipe(args.recipe, args.overrides, backend=args.backend or "auto", exit_after=args.exit_after,
                            synthetic_data=args.synthetic_data)
    if args.overrides:
        raise SystemExit(f"overrides {args.overrides} need a recipe name first")
    from prolong_nemo.training.cpu.main import run_flags

    try:
        cfg = config_from_args(args)
    except ValueError as e:
        raise SystemExit(f"prolong-nemo train: {e}") from None
    return run_flags(cfg, data=args.data or "synthetic", row_tokens=args.row_tokens or 256)
