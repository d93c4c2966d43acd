"""Write a Hugging Face tokenizer folder of the Llama-3 tokenizer (for `--tokenizer`, exports, HF loading).

Meta's offline tokenizer (llama-models' tiktoken ``tokenizer.model``) becomes a ``tokenizers`` BPE model
through transformers' own ``TikTokenConverter`` (Meta's split pattern, the special tokens at their
ids 128000..128255), saved as ``tokenizer.json`` + ``tokenizer_config.json`` (bos/eos, special tokens,
a Llama-3-Instruct chat template whose assistant turns sit in ``{% generation %}`` blocks) that
``transformers.AutoTokenizer.from_pretrained`` loads. Its ids equal the offline tokenizer's.

This module also encodes text and chats with any such folder for ``data tokenize --tokenizer``:
chats through the folder's own chat template, with the assistant mask the offline path gives.
"""

from __future__ import annotations

import argparse
import functools
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from prolong_nemo.errors import UserError

LLAMA3_VOCAB_SIZE = 128_256  # 128000 BPE tokens + 256 special tokens
BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
# The Llama-3-Instruct format, the one tokenize.encode_chat writes: bos, then per message
# "<|start_header_id|>{role}<|end_header_id|>\n\n{content stripped}<|eot_id|>". An assistant
# message's content and its <|eot_id|> are in a generation block (return_assistant_tokens_mask).
LLAMA3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first -%}{{ bos_token }}{%- endif -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endgeneration %}"
    "{%- else -%}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)
TOKENIZER_FILES_WRITTEN = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatTemplateError(ValueError):
    """A chat the tokenizer's template cannot render, or cannot give an assistant mask for."""


# ---------------------------------------------------------------------------------------------
# The offline tokenizer -> a Hugging Face tokenizer


@functools.lru_cache(maxsize=1)
def _converted_json() -> str:
    """The converted backend tokenizer, serialized (the conversion takes ~2 s: done once per process)."""
    import llama_models.llama3.tokenizer as meta
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = meta.Tokenizer.get_instance()
    specials = sorted(tok.special_tokens, key=tok.special_tokens.get)  # added in id order: 128000, ...
    converter = TikTokenConverter(vocab_file=str(Path(meta.__file__).parent / "tokenizer.model"),
                                  pattern=tok.pat_str, additional_special_tokens=specials)
    backend = converter.converted()
    wrong = [t for t in specials if backend.token_to_id(t) != tok.special_tokens[t]]
    if backend.get_vocab_size() != tok.n_words or wrong:
        raise RuntimeError(f"converted Llama-3 tokenizer disagrees with llama-models: {backend.get_vocab_size()} "
                           f"ids (want {tok.n_words}), special tokens at other ids: {wrong[:5]}")
    # BOS on encode(add_special_tokens=True), as the offline encode(bos=True) and Meta's HF release do
    bos = processors.TemplateProcessing(single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                                        special_tokens=[(BOS, tok.bos_id)])
    backend.post_processor = processors.Sequence([backend.post_processor, bos])
    return backend.to_str()


def eos_token_for(eos_token_id: int | Sequence[int] | None) -> str:
    """The tokenizer's eos_token for a model's eos id(s): <|eot_id|> when the model stops on it
    (Instruct), the token of the (first) id if it is a Llama-3 special token, else <|end_of_text|>."""
    from llama_models.llama3.tokenizer import Tokenizer

    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    tok = Tokenizer.get_instance()
    names = {i: t for t, i in tok.special_tokens.items()}
    if tok.eot_id in ids:
        return EOT
    return names.get(ids[0], EOS) if ids else EOS


def llama3_hf_tokenizer(eos_token: str = EOS):
    """The offline Llama-3 tokenizer as a transformers PreTrainedTokenizerFast (ids equal; the
    Llama-3-Instruct chat template)."""
    from tokenizers import Tokenizer as Backend
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Backend.from_str(_converted_json()), bos_token=BOS,
                                   eos_token=eos_token, chat_template=LLAMA3_CHAT_TEMPLATE,
                                   clean_up_tokenization_spaces=False,
                                   model_input_names=["input_ids", "attention_mask"])


def write_llama3_tokenizer(folder: Path, eos_token_id: int | Sequence[int] | None = None) -> list[str]:
    """Save the converted Llama-3 tokenizer into `folder` (created if needed); returns the files written.
    The chat template goes into tokenizer_config.json, which every transformers >= 4.34 reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf = llama3_hf_tokenizer(eos_token_for(eos_token_id))
    hf.save_pretrained(str(folder), save_jinja_files=False)
    return [name for name in TOKENIZER_FILES_WRITTEN if (folder / name).is_file()]


# ---------------------------------------------------------------------------------------------
# Encoding with a Hugging Face tokenizer folder (data tokenize --tokenizer)


def load(folder: str | Path, *, need_chat_template: bool = False):
    """AutoTokenizer.from_pretrained(folder), local files only, once per process and folder; any
    failure is one UserError line naming the folder."""
    hf = _load(str(folder))
    if need_chat_template and not hf.chat_template:
        raise UserError(f"{folder}: the tokenizer has no chat template, needed for chat inputs")
    return hf


@functools.lru_cache(maxsize=4)
def _load(folder: str):
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: tokenizer folder does not exist")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UserError(f"--tokenizer {folder}: needs transformers (pip install transformers)") from None
    try:
        hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # OSError, ValueError, JSON errors, ...: whatever the folder's fault is
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{folder}: not a tokenizer folder AutoTokenizer can load ({detail[:200]})") from None
    if not hf.is_fast:
        raise UserError(f"{folder}: a slow (Python) tokenizer; need a fast one (tokenizer.json) for offsets")
    return hf


def encode_text(hf, text: str) -> list[int]:
    """No BOS/EOS; special-token text stays plain text (split_special_tokens), as in the offline path."""
    return hf(text, add_special_tokens=False, split_special_tokens=True, return_attention_mask=False,
              verbose=False)["input_ids"]


def encode_chat(hf, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """The conversation through the tokenizer's own chat template; mask 1 on what the model must
    generate (the assistant turns), 0 elsewhere. Special-token text in contents becomes the control
    token here, as always with transformers chat templates.

    The mask: a template with ``{% generation %}`` blocks says itself which characters the model
    generates, so transformers' return_assistant_tokens_mask is used. Without them (most published
    templates) it is derived: the characters of assistant turn i are those that rendering
    messages[:i+1] adds to rendering messages[:i] with the generation prompt (so the assistant header
    stays 0), checked to be a prefix of the whole rendering; a token is 1 when it overlaps them. This
    works on characters, so it never depends on how the tokenizer merges across a turn boundary.
    """
    template = hf.get_chat_template()
    try:
        if _GENERATION_TAG.search(template):
            out = hf.apply_chat_template(list(messages), tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=True, tokenizer_kwargs={"verbose": False})
            return list(out["input_ids"]), list(out["assistant_masks"])
        text = hf.apply_chat_template(list(messages), tokenize=False)
        spans = _assistant_spans(hf, messages, text)
    except ChatTemplateError:
        raise
    except Exception as err:  # jinja2 TemplateError (raise_exception), a key the template needs, ...
        raise ChatTemplateError(f"chat template failed: {type(err).__name__}: {err}") from None
    enc = hf(text, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False, verbose=False)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(offsets), dtype=bool)
    for start, end in spans:
        mask |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
    return list(enc["input_ids"]), mask.astype(int).tolist()


def _assistant_spans(hf, messages: Sequence[dict], text: str) -> list[tuple[int, int]]:
    spans = []
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        # [[]]: transformers refuses an empty (unbatched) conversation; a batch of one is fine
        before = hf.apply_chat_template([list(messages[:i])], tokenize=False, add_generation_prompt=True)[0]
        upto = hf.apply_chat_template(list(messages[:i + 1]), tokenize=False)
        if i == 0 and before and not upto.startswith(before) and before in upto:
            start = upto.index(before) + len(before)  # no message before it: e.g. no BOS in `before`
        elif upto.startswith(before):
            start = len(before)
        else:
            raise ChatTemplateError(f"the chat template does not render messages[:{i}] + generation prompt as a "
                                    f"prefix of messages[:{i + 1}], so the assistant mask cannot be derived "
                                    "(a template with {% generation %} blocks can)")
        if not text.startswith(upto) or len(upto) <= start:
            raise ChatTemplateError(f"the chat template does not render messages[:{i + 1}] as a prefix of the "
                                    "whole conversation, so the assistant mask cannot be derived")
        spans.append((start, len(upto)))
    return spans


# ---------------------------------------------------------------------------------------------
# CLI: prolong-nemo data hf-tokenizer


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder to write (AutoTokenizer loads it)")
    parser.add_argument("--eos", choices=["end_of_text", "eot_id"], default="end_of_text",
                        help="eos_token: <|end_of_text|> (base models) or <|eot_id|> (Instruct models)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.overwrite)):
        raise UserError(f"{out} exists and is not an empty folder (use --overwrite)")
    written = write_llama3_tokenizer(out, 128009 if args.eos == "eot_id" else 128001)
    print(f"wrote the Llama-3 tokenizer ({', '.join(written)}) to {out}")
    return 0
