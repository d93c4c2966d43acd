"""`prolong-nemo convert ...`: Llama-3 checkpoints between Hugging Face and Megatron.

hf-to-megatron records the source's bos/eos ids, dtype and generation_config.json with the
checkpoint; megatron-to-hf writes them back (--dtype casts the tensors while streaming).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from prolong_nemo.errors import ConversionError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMG]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def _refuse_overlap(args: argparse.Namespace, *inputs: Path | None) -> None:
    if args.overwrite:  # the output folder is deleted: it must not be, hold or lie inside an input
        from prolong_nemo.convert.outputs import refuse_overlap

        refuse_overlap(args.out, inputs)


def _hf_to_megatron(args: argparse.Namespace) -> int:
    from prolong_nemo.convert.pipelines import hf_to_megatron

    _refuse_overlap(args, args.hf_dir)
    result = hf_to_megatron(
        args.hf_dir, args.out, rope_theta=args.rope_theta, max_position_embeddings=args.max_position_embeddings,
        overwrite=args.overwrite, fsync=not args.no_fsync, show_progress=not args.quiet,
    )
    print(f"wrote {result.output} ({result.tensors} tensors, {result.bytes / 1e9:.2f} GB, {result.seconds:.1f}s; "
          f"rope_theta={result.arch.rope_theta:g}, max_position_embeddings={result.arch.max_position_embeddings})")
    return 0


def _arch_override(args: argparse.Namespace):
    from prolong_nemo.convert import hf_config
    from prolong_nemo.model.config import preset

    extras = None
    if args.arch_from:
        arch, extras = hf_config.read_hf_model(args.arch_from)
    elif args.preset:
        arch = preset(args.preset)
    else:
        return None, None
    if args.rope_theta is not None:
        arch = arch.replace(rope_theta=args.rope_theta)
    if args.max_position_embeddings is not None:
        arch = arch.replace(max_position_embeddings=args.max_position_embeddings)
    return arch, extras  # --arch-from also gives the folder's bos/eos ids and generation_config.json


def _megatron_to_hf(args: argparse.Namespace) -> int:
    from prolong_nemo.convert.pipelines import megatron_to_hf

    if (args.rope_theta or args.max_position_embeddings) and not (args.arch_from or args.preset):
        raise ConversionError("--rope-theta / --max-position-embeddings only refine --arch-from / --preset; "
                              "by default the checkpoint's recorded config is exported")
    _refuse_overlap(args, args.ckpt, args.tokenizer, args.arch_from, args.ids_from)
    arch, extras = _arch_override(args)
    if args.ids_from:  # e.g. the Instruct model a run started from: it stops on <|eot_id|>
        from prolong_nemo.convert import hf_config

        extras = hf_config.read_hf_model(args.ids_from)[1]
    result = megatron_to_hf(
        args.ckpt, args.out, arch=arch, extras=extras, tokenizer_dir=args.tokenizer, dtype=args.dtype,
        max_shard_bytes=args.max_shard_size, overwrite=args.overwrite, fsync=not args.no_fsync,
        show_progress=not args.quiet,
    )
    print(f"wrote {result.output} ({result.tensors} tensors, {result.bytes / 1e9:.2f} GB, {result.seconds:.1f}s; "
          f"rope_theta={result.arch.rope_theta:g}, max_position_embeddings={result.arch.max_position_embeddings})")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from prolong_nemo.convert.verify import default_prompt, verify

    tokens = None
    if args.prompt_length:
        from prolong_nemo.convert.megatron_io import read_recorded_config, resolve_iter_dir

        arch = read_recorded_config(resolve_iter_dir(args.ckpt))[0]
        tokens = default_prompt(arch.vocab_size, args.prompt_length)
    result = verify(args.hf_dir, args.ckpt, tokens)
    for note in result.notes:
        print(f"note: {note}")
    ok = result.max_abs_logit_diff <= args.tolerance
    print(f"max |logit diff| = {result.max_abs_logit_diff:.3e} over {result.tokens} tokens "
          f"({'OK' if ok else 'FAIL'}, tolerance {args.tolerance:g})")
    return 0 if ok else 1


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-fsync", action="store_true", help="skip fsync of the written files (faster, less durable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


# `--dtype` choices: hf_config.EXPORT_DTYPES' names (not imported here: it imports torch, which
# `convert --help` does not need; tests/test_cli.py checks the two agree).
EXPORT_DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="convert_command", required=True)

    p = sub.add_parser("hf-to-megatron", help="HF Llama folder -> Megatron torch_dist checkpoint (Bridge layout)")
    p.add_argument("hf_dir", type=Path)
    p.add_argument("out", type=Path, help="checkpoint root to create (gets iter_0000000/)")
    p.add_argument("--rope-theta", type=float, help="record this rope_theta (ProLong stages: 8e6, 1.28e8)")
    p.add_argument("--max-position-embeddings", type=int, help="record this context length")
    _common(p)
    p.set_defaults(func=_hf_to_megatron)

    p = sub.add_parser("megatron-to-hf", help="Megatron torch_dist checkpoint -> HF safetensors + config.json")
    p.add_argument("ckpt", type=Path, help="checkpoint root (latest_checkpointed_iteration.txt) or iter_* folder")
    p.add_argument("out", type=Path)
    p.add_argument("--tokenizer", type=Path, help="copy tokenizer files from this folder")
    p.add_argument("--max-shard-size", type=parse_size, default="5GB", help="safetensors shard size (default 5GB)")
    p.add_argument("--dtype", choices=EXPORT_DTYPE_CHOICES, default="auto",
                   help="dtype of the exported tensors, cast while streaming; config.json's dtype follows "
                   "(default auto: the checkpoint's stored dtype)")
    p.add_argument("--arch-from", type=Path, help="HF folder whose config.json gives the architecture "
                   "(only for checkpoints without a recorded config)")
    p.add_argument("--preset", help="LlamaArch preset for checkpoints without a recorded config")
    p.add_argument("--ids-from", type=Path, help="HF folder whose bos/eos token ids (and generation_config.json, "
                   "else ids only) the export carries, keeping "
                   "the checkpoint's architecture (needed when the checkpoint records no ids, e.g. one "
                   "Megatron-Bridge saved without prolong_nemo's record; give the model the run started "
                   "from, e.g. Llama-3-8B-Instruct, so generation stops on <|eot_id|>)")
    p.add_argument("--rope-theta", type=float)
    p.add_argument("--max-position-embeddings", type=int)
    _common(p)
    p.set_defaults(func=_megatron_to_hf)

    p = sub.add_parser("verify", help="compare HF and Megatron logits on a prompt (small models, CPU)")
    p.add_argument("hf_dir", type=Path)
    p.add_argument("ckpt", type=Path)
    p.add_argument("--prompt-length", type=int, default=24)
    p.add_argument("--tolerance", type=float, default=1e-5, help="max |logit diff| accepted (fp32)")
    p.set_defaults(func=_verify)
