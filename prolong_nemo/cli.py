"""The `prolong-nemo` command line: one entry point, one module per command group.

Each command group lives next to the code it drives and exposes
``configure_parser(parser)``, which adds its arguments (or sub-commands) to
the parser of `prolong-nemo <group>` and sets ``func`` (called with the parsed args).
Groups are imported lazily so `prolong-nemo data ...` never pays for importing megatron.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

from prolong_nemo.errors import UserError

# (command, module that registers it, one-line help)
COMMAND_GROUPS: tuple[tuple[str, str, str], ...] = (
    ("data", "prolong_nemo.data.commands", "inspect, tokenize and pack ProLong MDS data"),
    ("train", "prolong_nemo.training.commands", "train a recipe (Megatron-Bridge on GPU, CPU runner otherwise)"),
    ("plan", "prolong_nemo.recipes.plan", "check a recipe's parallelism and estimate memory before launching"),
    ("launch", "prolong_nemo.recipes.launch", "submit a recipe through NeMo-Run (local or Slurm)"),
    ("convert", "prolong_nemo.convert.commands", "convert Llama-3 checkpoints between Hugging Face and Megatron"),
    ("demo", "prolong_nemo.demo", "end-to-end CPU demo: data, 64K-recipe training, SFT, conversion"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prolong-nemo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name, help_text in COMMAND_GROUPS:
        try:
            module = importlib.util.find_spec(module_name)
        except ModuleNotFoundError:
            module = None
        if module is None:
            continue
        # Register lazily: the group's module is imported only when its command runs.
        group = sub.add_parser(name, help=help_text, add_help=False)
        group.set_defaults(_group_module=module_name, command=name)
    return parser


# Messages megatron-core / torch print on every run that say nothing about this run: optional
# backends (TE, Apex) being absent, and deprecations inside the libraries' own code.
_NOISY_WARNINGS = (".*(Transformer Engine|Apex|absl).*", ".*torch.distributed is disabled.*",
                   ".*argument order of load has been changed.*", ".*Please use DTensor instead.*",
                   ".*full scope is deprecated.*", ".*Could not determine rank.*")
_NOISY_LOGS = {
    "megatron.core.models.gpt.gpt_model": "GPTModel IS DEPRECATED",
    "megatron.core.dist_checkpointing.strategies.common": "load_common is deprecated",
    "megatron.core.dist_checkpointing.strategies.torch": "async save is deprecated",
    "megatron.core.datasets.blended_dataset": "Cannot save the BlendedDataset indexes",
}


def quiet_known_noise() -> None:
    for pattern in _NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    for name, text in _NOISY_LOGS.items():
        logging.getLogger(name).addFilter(lambda record, text=text: text not in record.getMessage())


def main(argv: list[str] | None = None) -> int:
    quiet_known_noise()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    top, _ = parser.parse_known_args(argv[:1])
    module = importlib.import_module(top._group_module)
    group_parser = argparse.ArgumentParser(prog=f"prolong-nemo {top.command}")
    module.configure_parser(group_parser)
    # Options may follow positionals (`plan stage_64k --json parallel.cp=2`); argparse only
    # supports that for parsers without sub-commands.
    parse = group_parser.parse_args if group_parser._subparsers else group_parser.parse_intermixed_args
    args = parse(argv[1:])
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError, FileExistsError) as e:  # bad input or paths: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
