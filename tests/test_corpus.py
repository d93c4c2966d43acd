"""The offline stdlib corpus: deterministic, distinct domains, and it runs through tokenize + pack."""

import ast
import json

import numpy as np

from prolong_nemo.data.corpus import build_corpus, chat_dialogues, code_documents, prose_documents
from prolong_nemo.data.packer import PackOptions, pack_mds
from prolong_nemo.data.tokenize import TokenizeOptions, tokenize_files

SMALL = dict(max_chars_per_domain=120_000, max_dialogues=40)


def test_deterministic(tmp_path):
    first = build_corpus(tmp_path / "a", **SMALL)
    second = build_corpus(tmp_path / "b", **SMALL)
    for x, y in zip((first.prose, first.code, first.chat), (second.prose, second.code, second.chat)):
        assert x.read_bytes() == y.read_bytes() and x.stat().st_size > 10_000


def test_domains_are_distinct():
    prose = prose_documents(max_chars=200_000)
    code = code_documents(max_chars=200_000)
    assert len(prose) > 10 and len(code) > 3
    assert sum(map(len, prose)) <= 200_000 and sum(map(len, code)) <= 200_000
    for src in code:
        ast.parse(src)  # real Python source
    # The reference manual quotes some code, so compare densities: code has many more
    # definitions and indented lines per character (measured ~9x on CPython 3.12).
    def density(docs, pattern):
        return sum(t.count(pattern) for t in docs) / sum(map(len, docs))

    assert density(code, "def ") > 5 * density(prose, "def ")
    assert density(code, "\n    ") > 5 * density(prose, "\n    ")


def test_chat_dialogues_are_well_formed():
    dialogues = chat_dialogues(max_dialogues=30)
    assert len(dialogues) == 30
    for i, messages in enumerate(dialogues):
        roles = [m["role"] for m in messages]
        assert roles == (["system"] if i % 3 == 0 else []) + ["user", "assistant", "user", "assistant"]
        assert all(m["content"].strip() for m in messages)
        name = messages[-4]["content"].split("`")[1]
        assert not name.split(".")[0].startswith("_")
        assert name.split(".")[-1] in messages[-1]["content"]


def test_corpus_tokenize_and_pack_end_to_end(tmp_path):
    from prolong_nemo.data.mds import MdsDomain

    files = build_corpus(tmp_path / "corpus", **SMALL)
    stats = tokenize_files(list(files.pretraining), tmp_path / "raw", TokenizeOptions(workers=1), progress=False)
    assert set(stats.per_domain) == {"prose", "code"} and stats.tokens_out > 30_000
    chat = tokenize_files([files.chat], tmp_path / "raw_chat", TokenizeOptions(workers=1), progress=False)
    assert chat.documents_out == 40 and 0 < chat.masked_tokens < chat.tokens_out

    opts = PackOptions(pack_length=4096, min_length=64, split_lengths=(4096, 1024), bos_id=128000,
                       eos_id=128001, split_by_domain=True)
    packed = pack_mds([tmp_path / "raw"], tmp_path / "packed", opts, progress=False)
    assert packed.balanced and packed.documents_in == stats.documents_out
    assert packed.samples_out.get("code/4096-4096", 0) > 0  # some source files exceed 4096 tokens
    for subset in packed.samples_out:
        domain = MdsDomain(str(tmp_path / "packed" / subset))
        assert len(domain) == packed.samples_out[subset]
        sample = domain[0]
        assert len(sample.input_ids) == 4096 and sample.domain == subset

    sft = pack_mds([tmp_path / "raw_chat"], tmp_path / "sft", PackOptions(pack_length=2048, bos_id=128000,
                   eos_id=128001), progress=False)
    domain = MdsDomain(str(tmp_path / "sft"))
    assert len(domain) == sft.samples_out[""] > 0
    sample = domain[0]
    assert sample.mask is not None and sample.domain == "chat"
    # every document segment starts with <|begin_of_text|> (or is a carried tail) and masks are 0/1
    assert set(np.unique(sample.mask).tolist()) == {0, 1}
    assert json.loads((tmp_path / "sft" / "index.json").read_text())["shards"][0]["compression"] is None
