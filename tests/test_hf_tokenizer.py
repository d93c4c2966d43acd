"""The offline Llama-3 tokenizer as a Hugging Face folder: id parity, its chat template and mask,
`data tokenize --tokenizer`, and exports that carry it when their source has no tokenizer."""

from __future__ import annotations

import json
import logging
import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from prolong_nemo.cli import main as cli_main
from prolong_nemo.data import hf_tokenizer
from prolong_nemo.data.tokenize import InputError, TokenizeOptions, encode_chat, get_tokenizer, tokenize_files
from test_tokenize import CHAT, read_docs, write_jsonl

pytest.importorskip("transformers")

SPECIAL_TEXT = ["<|eot_id|>", "<|begin_of_text|>hi", "a<|start_header_id|>user<|end_header_id|>\n\nb",
                "<|reserved_special_token_5|>", "<|eot_id", "<|python_tag|>print(1)"]
FIXED = [
    "", " ", "  ", "\t", "\n", "\n\n", "\n\n\n\n", " \n ", "\r\n", "\r\n\r\n", "a  b   c    d", "end   ",
    "   start", "tab\tsep\t\tarated", "\u00a0nbsp\u00a0", "ideographic\u3000space", "line\u2028sep",
    "0", "7", "42", "123", "1234", "1234567890", "3.14159", "1,000,000", "-42", "+1e-10", "0x1F", "2024-06-01",
    "١٢٣ arabic digits", "Ⅻ roman", "I'm", "DON'T", "they'll", "it's", "We'VE", "o'clock", "'s", "''",
    "Hello, world!", "naïve café résumé", "Straße", "ǅ digraph", "e\u0301 combining", "Z\u0351\u0342a\u0300lgo",
    "日本語のテキストです。", "中文文本，标点！", "한국어 문장", "Привет, мир", "Γειά σου", "שלום עולם", "مرحبا بالعالم",
    "हिन्दी पाठ", "ไทย", "🙂", "👨\u200d👩\u200d👧", "🇫🇷🇩🇪", "emoji 🎉🎉🎉 run", "\U0001d400 math bold",
    "\x00nul\x01ctl\x7f", "\ufeffbom", "\ufffd", "€£¥₹", "©®™", "∑∫√∞≠", "→←↑↓",
    "def f(x):\n    return x ** 2\n", "    indented\n\tmixed\n", "if (a && b) { return c; }",
    '{"key": [1, 2, {"n": null}]}', "<div class=\"x\">&amp;</div>", "SELECT * FROM t WHERE id=1;",
    "#include <stdio.h>\nint main(){printf(\"%d\\n\",1);}", "x = [i for i in range(10) if i % 2]",
    "http://example.com/path?q=1&r=2#frag", "user@example.com", "C:\\Windows\\path", "$HOME/.bashrc",
    "a" * 300, "ab" * 200, "1" * 100, " " * 100, "\n" * 50, "!!!???...", "---===+++", "____init____",
] + SPECIAL_TEXT
POOL = (list("abcXYZ019 \t\n\r.,'\"-_()[]{}<>|/\\!?:;#@$%^&*=+~`") + ["é", "ß", "ñ", "日", "本", "한", "Я", "ع",
        "\u0301", "\u00a0", "\u3000", "🙂", "🎉", "\u200d", "'s", "'ll", "<|eot_id|>", "<|begin_of_text|>",
        "  ", "\n\n", "123", "def ", "return"])


def parity_strings() -> list[str]:
    rng = random.Random(0)
    randoms = ["".join(rng.choice(POOL) for _ in range(rng.randint(1, 60))) for _ in range(300)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])  # real code and prose every Python install carries
    files = [stdlib / name for name in ("textwrap.py", "json/decoder.py", "this.py", "difflib.py")]
    return FIXED + randoms + [f.read_text() for f in files]


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama3_hf")
    assert hf_tokenizer.write_llama3_tokenizer(folder) == ["tokenizer.json", "tokenizer_config.json",
                                                          "special_tokens_map.json"]
    return folder


@pytest.fixture(scope="module")
def hf(hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


PLAIN_TEMPLATE = hf_tokenizer.LLAMA3_CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")


@pytest.fixture(scope="module")
def plain_template_dir(hf_dir, tmp_path_factory):
    """The same tokenizer with the chat template minus its {% generation %} blocks."""
    return with_template(hf_dir, tmp_path_factory.mktemp("plain") / "llama3", PLAIN_TEMPLATE)


def test_hf_tokenizer_gives_the_offline_ids(hf, tok):
    strings = parity_strings()
    assert len(strings) == 396 and sum(len(s) for s in strings) > 100_000
    plain = same = bos = decoded = 0
    for s in strings:
        offline_plain = tok.encode(s, bos=False, eos=False)  # special-token text as text
        offline_all = tok.encode(s, bos=False, eos=False, allowed_special="all")
        plain += hf.encode(s, add_special_tokens=False, split_special_tokens=True) == offline_plain
        same += hf.encode(s, add_special_tokens=False) == offline_all
        bos += hf.encode(s) == tok.encode(s, bos=True, eos=False, allowed_special="all")
        decoded += hf.decode(offline_all) == tok.decode(offline_all)
    assert (plain, same, bos, decoded) == (len(strings),) * 4
    assert hf.encode("<|eot_id|>", add_special_tokens=False) == [128009]  # the control token ...
    assert hf_tokenizer.encode_text(hf, "<|eot_id|>") == [27, 91, 68, 354, 851, 91, 29]  # ... or text: "<", "|", ...
    # The one known difference: llama-models cuts whitespace runs of over 25K characters first.
    run = "a" + " " * 26_000 + "b"
    assert len(tok.encode(run, bos=False, eos=False)) - len(hf_tokenizer.encode_text(hf, run)) == 1


def test_folder_config_special_tokens_and_template(hf_dir, hf, tok):
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and not (hf_dir / "chat_template.jinja").exists()
    assert config["chat_template"] == hf_tokenizer.LLAMA3_CHAT_TEMPLATE
    assert (config["bos_token"], config["eos_token"]) == ("<|begin_of_text|>", "<|end_of_text|>")
    assert (hf.bos_token_id, hf.eos_token_id, len(hf)) == (128000, 128001, 128256)
    assert {t: hf.convert_tokens_to_ids(t) for t in tok.special_tokens} == tok.special_tokens
    assert len(tok.special_tokens) == 256 and tok.n_words == hf_tokenizer.LLAMA3_VOCAB_SIZE
    added = config["added_tokens_decoder"]
    assert len(added) == 256 and all(v["special"] for v in added.values())
    assert hf_tokenizer.eos_token_for([128001, 128008, 128009]) == "<|eot_id|>"
    assert hf_tokenizer.eos_token_for(128001) == hf_tokenizer.eos_token_for(None) == "<|end_of_text|>"


CHATS = [
    CHAT[:3],
    [{"role": "system", "content": "  You are terse.\n"}, {"role": "user", "content": "\n\nHi  "},
     {"role": "assistant", "content": "Hello!\n"}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "  4  "}, {"role": "user", "content": "Bye"},
     {"role": "assistant", "content": "Bye.\n\n"}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],  # empty contents
    [{"role": "system", "content": ""}, {"role": "user", "content": " \t\n "}, {"role": "assistant", "content": "ok"}],
    [{"role": "assistant", "content": "I start."}, {"role": "user", "content": "Fine."},
     {"role": "assistant", "content": " 日本語 🙂 “quotes” "}],  # assistant first
    [{"role": "user", "content": "def f():\n    return 1\n"}, {"role": "assistant", "content": "```py\nf()\n```"}],
    [{"role": "user", "content": "no answer yet"}],
]


@pytest.mark.parametrize("template", ["generation", "prefixes"])
def test_chat_template_gives_offline_ids_and_mask(template, hf_dir, plain_template_dir, tok):
    hf = hf_tokenizer.load(hf_dir if template == "generation" else plain_template_dir)
    assert ("{% generation %}" in hf.chat_template) == (template == "generation")
    for chat in CHATS:
        ids, mask = hf_tokenizer.encode_chat(hf, chat)
        want_ids, want_mask = encode_chat(tok, chat)
        assert ids == want_ids and mask == want_mask
    assert sum(sum(encode_chat(tok, c)[1]) for c in CHATS) == 39  # masks are not all zeros
    ids = hf.apply_chat_template(CHATS[-1], add_generation_prompt=True)
    assert ids == encode_chat(tok, CHATS[-1])[0] + [128006, 78191, 128007, 271]  # "assistant", "\n\n"


def with_template(hf_dir: Path, folder: Path, template: str | None) -> Path:
    """A copy of the Llama-3 folder with another chat template (None: none)."""
    folder.mkdir()
    for name in ("tokenizer.json", "special_tokens_map.json"):
        (folder / name).write_bytes((hf_dir / name).read_bytes())
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return folder


def test_chat_template_errors_name_the_record(tmp_path, hf_dir):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHATS[2]}, {"messages": CHAT}])
    counting = with_template(hf_dir, tmp_path / "counting", "{{ messages | length }}" + PLAIN_TEMPLATE)
    with pytest.raises(InputError, match=r"c\.jsonl:1: the chat template does not render messages\[:1\]"):
        tokenize_files([path], tmp_path / "out", TokenizeOptions(tokenizer=str(counting)), progress=False)
    raising = with_template(hf_dir, tmp_path / "raising", "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(InputError, match="c.jsonl:1: chat template failed: TemplateError: roles must alternate"):
        tokenize_files([path], tmp_path / "out", TokenizeOptions(tokenizer=str(raising)), progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_tokenize_with_hf_folder_equals_offline(tmp_path, hf_dir, workers):
    chats = [{"messages": c} for c in CHATS] + [
        {"messages": [{"role": "user", "content": f" Question {i}? "},
                      {"role": "assistant", "content": f"Answer {i}. " * (i % 5 + 1)}]} for i in range(40)]
    texts = [{"text": s} for s in parity_strings()[:120]]
    chat_path, text_path = write_jsonl(tmp_path / "sft.jsonl", chats), write_jsonl(tmp_path / "web.jsonl", texts)
    for path in (chat_path, text_path):
        hf_opts = TokenizeOptions(workers=workers, batch_size=8, tokenizer=str(hf_dir))
        s_hf = tokenize_files([path], tmp_path / f"hf_{path.stem}", hf_opts, progress=False)
        s_off = tokenize_files([path], tmp_path / f"off_{path.stem}", TokenizeOptions(workers=1), progress=False)
        a, b = read_docs(tmp_path / f"hf_{path.stem}"), read_docs(tmp_path / f"off_{path.stem}")
        assert len(a) == len(b) == s_off.documents_out and (s_hf.tokens_out, s_hf.masked_tokens) == (
            s_off.tokens_out, s_off.masked_tokens)
        for x, y in zip(a, b):
            assert x["input_ids"].tolist() == y["input_ids"].tolist() and x["domain"] == y["domain"]
            assert ("mask" in x) == ("mask" in y) == (path == chat_path)
            if "mask" in x:
                assert x["mask"].dtype == np.uint8 and x["mask"].tolist() == y["mask"].tolist()
    assert len(read_docs(tmp_path / "hf_sft")) == 47 and s_off.documents_out == 119  # "" is skipped
    if workers == 1:  # loaded once per process, however many records
        hf_tokenizer._load.cache_clear()
        tokenize_files([chat_path], tmp_path / "again", TokenizeOptions(workers=1, tokenizer=str(hf_dir)),
                       progress=False)
        assert hf_tokenizer._load.cache_info().misses == 1


def test_bad_tokenizer_folder_is_one_line(tmp_path, capsys, hf_dir):
    data = write_jsonl(tmp_path / "web.jsonl", [{"text": "x"}])
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "tokenizer.json").write_text("{not json")
    for bad, why in [(tmp_path / "missing", "tokenizer folder does not exist"),
                     (tmp_path / "empty", "not a tokenizer folder AutoTokenizer can load"),
                     (tmp_path / "junk", "not a tokenizer folder AutoTokenizer can load")]:
        assert cli_main(["data", "tokenize", str(data), "-o", str(tmp_path / "out"), "--tokenizer", str(bad),
                         "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{bad}: {why}" in err
        assert not (tmp_path / "out").exists()
    notemplate = with_template(hf_dir, tmp_path / "notemplate", None)
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    assert cli_main(["data", "tokenize", str(chat), "-o", str(tmp_path / "out"), "--tokenizer", str(notemplate)]) == 2
    assert f"{notemplate}: the tokenizer has no chat template" in capsys.readouterr().err
    # plain text needs no template
    assert cli_main(["data", "tokenize", str(data), "-o", str(tmp_path / "out"), "--tokenizer", str(notemplate),
                     "-j", "1", "--no-progress"]) == 0


def test_cli_writes_a_loadable_folder(tmp_path, capsys, tok):
    from transformers import AutoTokenizer

    assert cli_main(["data", "hf-tokenizer", "-o", str(tmp_path / "t"), "--eos", "eot_id"]) == 0
    assert "wrote the Llama-3 tokenizer (tokenizer.json, tokenizer_config.json" in capsys.readouterr().out
    hf = AutoTokenizer.from_pretrained(tmp_path / "t")
    assert hf.eos_token == "<|eot_id|>" and hf.encode("x y") == tok.encode("x y", bos=True, eos=False)
    assert cli_main(["data", "hf-tokenizer", "-o", str(tmp_path / "t")]) == 2  # not empty


# ---------------------------------------------------------------- exports


def test_export_without_source_tokenizer_carries_the_llama3_one(tmp_path, caplog, tok):
    from test_convert import make_hf_model, quiet
    from transformers import AutoTokenizer

    from prolong_nemo.convert import hf_to_megatron, megatron_to_hf

    src = make_hf_model(tmp_path / "hf", shard="10MB", vocab_size=128_256, hidden_size=16, intermediate_size=32,
                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                        tie_word_embeddings=True, bos_token_id=128000, eos_token_id=[128001, 128008, 128009])
    assert not (src / "tokenizer.json").exists()  # save_pretrained of a model writes no tokenizer
    hf_to_megatron(src, tmp_path / "mg", **quiet())
    with caplog.at_level(logging.WARNING, logger="prolong_nemo.convert.outputs"):
        megatron_to_hf(tmp_path / "mg", tmp_path / "out", **quiet())
    assert [r.getMessage() for r in caplog.records] == [
        "no tokenizer files in the source: wrote the converted offline Llama-3 tokenizer (tokenizer.json, "
        "tokenizer_config.json, special_tokens_map.json, eos_token <|eot_id|>) to the export"]
    hf = AutoTokenizer.from_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf.eos_token_id == 128009 and hf.bos_token_id == config["bos_token_id"] == 128000
    for s in parity_strings()[::7]:
        assert hf.encode(s, add_special_tokens=False) == tok.encode(s, bos=False, eos=False, allowed_special="all")
    assert hf.apply_chat_template(CHATS[1]) == encode_chat(tok, CHATS[1])[0]
    # a source tokenizer is still what an export carries
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "tokenizer.json").write_bytes((tmp_path / "out" / "tokenizer.json").read_bytes())
    (tmp_path / "own" / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    caplog.clear()
    megatron_to_hf(tmp_path / "mg", tmp_path / "out2", tokenizer_dir=tmp_path / "own", **quiet())
    assert caplog.records == [] and (tmp_path / "out2" / "tokenizer_config.json").read_text() == (
        '{"tokenizer_class": "PreTrainedTokenizerFast"}')
    assert not (tmp_path / "out2" / "special_tokens_map.json").exists()


def test_export_of_a_small_vocab_model_gets_no_llama3_tokenizer(tmp_path, caplog):
    from test_convert import make_hf_model, quiet

    from prolong_nemo.convert import hf_to_megatron, megatron_to_hf

    hf_to_megatron(make_hf_model(tmp_path / "hf", dtype=torch.float32), tmp_path / "mg", **quiet())
    with caplog.at_level(logging.WARNING, logger="prolong_nemo.convert.outputs"):
        megatron_to_hf(tmp_path / "mg", tmp_path / "out", **quiet())
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    assert [r.getMessage() for r in caplog.records] == [
        "no tokenizer in the export: none in the source, and the model's 256-token vocabulary is smaller than "
        "the Llama-3 tokenizer's 128256 (pass a tokenizer folder)"]
