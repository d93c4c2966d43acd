"""`prolong-nemo data tokenize`: Llama-3 encoding, the chat format and its mask, MDS output, errors."""

import gzip
import json

import numpy as np
import pytest
from streaming.base.local import LocalDataset

from prolong_nemo.cli import main as cli_main
from prolong_nemo.data.tokenize import (InputError, TokenizeOptions, encode_chat, encode_text, get_tokenizer,
                                        tokenize_files)

CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "  What is 2+2?\n"},
    {"role": "assistant", "content": "It is 4.\n\nAnything else?  "},
    {"role": "user", "content": "Say <|eot_id|> literally."},
    {"role": "assistant", "content": "(sure) <|eot_id|> – done"},
]


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def test_special_ids(tok):
    sp = tok.special_tokens
    assert (tok.bos_id, tok.eos_id, tok.eot_id) == (128000, 128001, 128009)
    assert (sp["<|start_header_id|>"], sp["<|end_header_id|>"]) == (128006, 128007)


def test_encode_text_equals_meta_encode(tok):
    """The fast path must equal llama-models' Tokenizer.encode, including its 400K-char chunking
    and its split of >25K-character runs."""
    from llama_models.llama3 import tokenizer as meta

    assert meta.TIKTOKEN_MAX_ENCODE_CHARS == 400_000 and meta.MAX_NO_WHITESPACES_CHARS == 25_000
    words = " ".join(f"word{i % 97}," for i in range(90_000))  # ~700K chars: crosses a 400K cut
    texts = [words, "x" * 30_000 + " tail", "a" + " " * 26_000 + "b\u3000\u2028" * 3, "\x1c" * 25_001 + "z",
             "plain short text", ""]
    for text in texts:
        assert encode_text(tok, text) == tok.encode(text, bos=False, eos=False)


def test_text_never_produces_special_tokens(tok):
    ids = encode_text(tok, "a <|eot_id|> b <|begin_of_text|>")
    assert ids and max(ids) < 128000
    assert tok.decode(ids) == "a <|eot_id|> b <|begin_of_text|>"


def test_chat_matches_rendered_template(tok):
    """Independent construction 1: render the Llama-3 template as one string, encode it at once.

    (Contents without literal special-token text: rendered as one string, a literal "<|eot_id|>"
    would become the control token, which our encoder deliberately never does.)
    """
    chat = CHAT[:3] + [{"role": "user", "content": "Thanks! And 3*3?"},
                       {"role": "assistant", "content": "\n9 -- “nine”.\n"}]
    ids, mask = encode_chat(tok, chat)
    rendered = "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in chat)
    assert ids == tok.encode(rendered, bos=False, eos=False, allowed_special="all")
    assert len(mask) == len(ids) and ids.count(128009) == len(chat)


def test_literal_special_text_in_chat_stays_text(tok):
    ids, _ = encode_chat(tok, CHAT)
    assert ids.count(128009) == len(CHAT) and ids.count(128000) == 1


def test_chat_matches_meta_chat_format(tok):
    """Independent construction 2: Meta's own ChatFormat.encode_message (llama-models)."""
    from llama_models.datatypes import RawMessage, StopReason
    from llama_models.llama3.chat_format import ChatFormat

    fmt = ChatFormat(tok)
    expected = [tok.bos_id]
    for m in CHAT:
        msg = RawMessage(role=m["role"], content=m["content"].strip(), stop_reason=StopReason.end_of_turn)
        expected += fmt.encode_message(msg, tool_prompt_format=None)[0]
    assert encode_chat(tok, CHAT)[0] == expected


def test_chat_mask_covers_assistant_content_and_eot(tok):
    ids, mask = encode_chat(tok, CHAT)
    ids, mask = np.array(ids), np.array(mask)
    # Hand-derived: mask runs are exactly [content tokens..., <|eot_id|>] of each assistant turn.
    runs = np.split(np.flatnonzero(mask), np.flatnonzero(np.diff(np.flatnonzero(mask)) > 1) + 1)
    assistant = [m["content"].strip() for m in CHAT if m["role"] == "assistant"]
    assert len(runs) == len(assistant)
    for run, content in zip(runs, assistant):
        assert ids[run[-1]] == 128009
        assert tok.decode(ids[run].tolist()) == content + "<|eot_id|>"
        # what precedes is the assistant header "...assistant<|end_header_id|>\n\n"
        assert tok.decode(ids[run[0] - 4:run[0]].tolist()) == "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert mask[0] == 0 and set(mask.tolist()) == {0, 1}


def write_jsonl(path, records, compress=False):
    text = "".join(json.dumps(r) + "\n" for r in records)
    if compress:
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


def read_docs(folder):
    data = LocalDataset(str(folder))
    return [data[i] for i in range(len(data))]


def test_text_and_jsonl_to_mds(tmp_path, tok):
    a = write_jsonl(tmp_path / "web.jsonl", [{"text": "First document."}, {"text": "Second one.", "domain": "wiki"},
                                              {"text": ""}])
    b = write_jsonl(tmp_path / "more.jsonl.gz", [{"text": "Gzipped text."}], compress=True)
    c = tmp_path / "book.txt"
    c.write_text("A whole book\n\nin one file.")
    stats = tokenize_files([a, b, c], tmp_path / "out", TokenizeOptions(workers=1), progress=False)
    docs = read_docs(tmp_path / "out")
    want = [("First document.", "web"), ("Second one.", "wiki"), ("Gzipped text.", "more"),
            ("A whole book\n\nin one file.", "book")]
    assert [(tok.decode(d["input_ids"].tolist()), d["domain"]) for d in docs] == want
    for d, (text, _) in zip(docs, want):
        assert d["input_ids"].dtype == np.uint32 and d["input_ids"].tolist() == encode_text(tok, text)
        assert d["length"] == len(d["input_ids"]) and "mask" not in d  # no BOS/EOS in raw documents
    assert stats.empty_skipped == 1 and stats.documents_out == 4 and stats.records == 5
    index = json.loads((tmp_path / "out" / "index.json").read_text())["shards"][0]
    assert dict(zip(index["column_names"], index["column_encodings"])) == {
        "input_ids": "ndarray:uint32", "length": "int", "domain": "str"}
    assert index["compression"] is None


def test_chat_jsonl_and_workers_are_deterministic(tmp_path, tok):
    records = [{"messages": CHAT}] + [
        {"messages": [{"role": "user", "content": f"Question {i}?"},
                      {"role": "assistant", "content": f"Answer number {i}. " * (i % 7 + 1)}]}
        for i in range(150)]
    path = write_jsonl(tmp_path / "sft.jsonl", records)
    stats1 = tokenize_files([path], tmp_path / "one", TokenizeOptions(workers=1, batch_size=8), progress=False)
    stats2 = tokenize_files([path], tmp_path / "two", TokenizeOptions(workers=2, batch_size=8), progress=False)
    one, two = read_docs(tmp_path / "one"), read_docs(tmp_path / "two")
    assert len(one) == len(two) == 151 and stats1.tokens_out == stats2.tokens_out
    for r, d1, d2 in zip(records, one, two):
        ids, mask = encode_chat(tok, r["messages"])
        assert d1["input_ids"].tolist() == d2["input_ids"].tolist() == ids
        assert d1["mask"].dtype == np.uint8 and d1["mask"].tolist() == d2["mask"].tolist() == mask
        assert d1["domain"] == "sft"
    assert stats1.masked_tokens == sum(int(d["mask"].sum()) for d in one)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', "bad.jsonl:3: invalid JSON"),
    ('{"txt": "no text field"}', "bad.jsonl:3: missing string field 'text'"),
    ('["not", "an", "object"]', "bad.jsonl:3: expected a JSON object"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, workers, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n")
    with pytest.raises(InputError, match=message):
        tokenize_files([path], tmp_path / "out", TokenizeOptions(workers=workers), progress=False)
    assert not (tmp_path / "out").exists()  # no partial dataset left behind


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(InputError, match="latin1.jsonl:2: not valid UTF-8"):
        tokenize_files([path], tmp_path / "out", progress=False)
    txt = tmp_path / "latin1.txt"
    txt.write_bytes(b"caf\xe9")
    with pytest.raises(InputError, match="latin1.txt: not valid UTF-8"):
        tokenize_files([txt], tmp_path / "out2", progress=False)


def test_malformed_chat(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}, {"messages": [{"role": "user"}]}])
    with pytest.raises(InputError, match=r"c.jsonl:2: messages\[0\] needs a string 'content'"):
        tokenize_files([path], tmp_path / "out", progress=False)
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": []}])
    with pytest.raises(InputError, match="d.jsonl:1: missing or empty 'messages'"):
        tokenize_files([path], tmp_path / "out", TokenizeOptions(fmt="chat"), progress=False)


def test_refuses_chat_mixed_with_text(tmp_path):
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    with pytest.raises(InputError, match="mixed"):
        tokenize_files([chat, text], tmp_path / "out", progress=False)


def test_cli_tokenize(tmp_path, capsys):
    path = write_jsonl(tmp_path / "web.jsonl", [{"text": "Hello world"}] * 3)
    assert cli_main(["data", "tokenize", str(path), "-o", str(tmp_path / "out"), "-j", "1", "--domain", "fw",
                     "--no-progress"]) == 0
    assert "documents written: 3" in capsys.readouterr().out
    assert [d["domain"] for d in read_docs(tmp_path / "out")] == ["fw"] * 3
    assert cli_main(["data", "tokenize", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "x")]) == 2
