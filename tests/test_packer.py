"""`prolong-nemo data pack` against hand-computed samples and a plain list-based reference packer."""

import json
from pathlib import Path

import numpy as np
import pytest
from streaming import MDSWriter
from streaming.base.local import LocalDataset

from prolong_nemo.cli import main as cli_main
from prolong_nemo.data.packer import Document, PackOptions, pack_documents, pack_mds

BOS, EOS = 128000, 128001
RAW_COLUMNS = {"input_ids": "ndarray:uint32", "length": "int", "domain": "str"}


# ---- the reference, written plainly from datatools `pack` (github.com/CodeCreator/datatools) --

def _wrap(tokens, mask, first=None, last=None):
    """Add first/last special tokens (mask 0) unless missing, tokens empty, or already there."""
    tokens, mask = list(tokens), list(mask)
    if first is not None and tokens and tokens[0] != first:
        tokens, mask = [first] + tokens, [0] + mask
    if last is not None and tokens and tokens[-1] != last:
        tokens, mask = tokens + [last], mask + [0]
    return tokens, mask


def reference_pack(docs, opts):
    """[(subset, tokens, indices, mask, domain)] and dropped-token counts, one document at a time.

    The `domain` column is the subset path, or the first segment's document domain without one.
    """
    L = opts.pack_length
    buffers, out = {}, []
    dropped = {"tail": 0, "split": 0, "final": 0}

    def feed(subset, tokens, mask, domain):
        buf = buffers.setdefault(subset, [])
        buf.append((tokens, mask, domain))
        while sum(len(t) for t, _, _ in buf) >= L:
            flat = [x for t, _, _ in buf for x in t]
            flat_mask = [x for _, m, _ in buf for x in m]
            indices, start = [], 0
            for t, _, _ in buf:
                indices.append([start, min(start + len(t), L)])
                start += len(t)
                if start >= L:
                    break
            out.append((subset, flat[:L], indices, flat_mask[:L], subset or buf[0][2]))
            tail, tail_mask = _wrap(flat[L:], flat_mask[L:], first=opts.mos_id)
            buf.clear()
            if len(tail) >= opts.min_length:
                buf.append((tail, tail_mask, domain))
            else:
                dropped["tail"] += len(tail)

    for doc in docs:
        mask = [1] * len(doc.input_ids) if doc.mask is None else [int(x) for x in doc.mask]
        tokens, mask = _wrap([int(x) for x in doc.input_ids], mask, first=opts.bos_id, last=opts.eos_id)
        if not tokens:
            continue
        base = doc.domain if opts.split_by_domain else ""
        if not opts.split_lengths:
            feed(base, tokens, mask, doc.domain)
            continue
        lengths = sorted(opts.split_lengths, reverse=True)
        while len(tokens) >= lengths[-1]:
            n = max(x for x in lengths if x <= len(tokens))
            feed(str(Path(base) / f"{n}-{L}"), tokens[:n], mask[:n], doc.domain)
            tokens, mask = _wrap(tokens[n:], mask[n:], first=opts.mos_id)
        dropped["split"] += len(tokens)
    dropped["final"] = sum(len(t) for buf in buffers.values() for t, _, _ in buf)
    return out, dropped


def random_docs(seed, n, max_len, with_mask=False, domains=("a",)):
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        length = int(rng.integers(0, max_len))
        ids = rng.integers(0, 1000, length).astype(np.uint32)
        mask = rng.integers(0, 2, length).astype(np.uint8) if with_mask else None
        docs.append(Document(ids, domains[i % len(domains)], mask))
    return docs


OPTION_GRID = [
    PackOptions(pack_length=16),
    PackOptions(pack_length=16, min_length=5, bos_id=BOS, eos_id=EOS),
    PackOptions(pack_length=16, min_length=3, bos_id=BOS, eos_id=EOS, mos_id=BOS),
    PackOptions(pack_length=32, split_lengths=(32, 8)),
    PackOptions(pack_length=32, min_length=4, split_lengths=(8, 32), bos_id=BOS, eos_id=EOS, mos_id=EOS),
    PackOptions(pack_length=24, split_lengths=(16,), split_by_domain=True, bos_id=BOS),
    PackOptions(pack_length=7, min_length=2, split_by_domain=True, eos_id=EOS),
]


@pytest.mark.parametrize("opts", OPTION_GRID)
@pytest.mark.parametrize("with_mask", [False, True])
def test_matches_reference_packer(opts, with_mask):
    docs = random_docs(seed=len(str(opts)), n=60, max_len=80, with_mask=with_mask, domains=("a", "b"))
    got, stats = pack_documents(docs, opts)
    want, dropped = reference_pack(docs, opts)
    assert len(got) == len(want) > 0
    for (subset, sample), (w_subset, w_tokens, w_indices, w_mask, w_domain) in zip(got, want):
        assert subset == w_subset
        assert sample.input_ids.dtype == np.uint32 and sample.input_ids.tolist() == w_tokens
        assert sample.indices.dtype == np.uint32 and sample.indices.tolist() == w_indices
        if with_mask:
            assert sample.mask.dtype == np.uint8 and sample.mask.tolist() == w_mask
        else:
            assert sample.mask is None
        assert sample.domain == w_domain
    assert stats.dropped_short_tail == dropped["tail"]
    assert stats.dropped_below_split == dropped["split"]
    assert sum(stats.dropped_final_buffer.values()) == dropped["final"]
    assert stats.tokens_out == len(got) * opts.pack_length
    assert stats.documents_in == 60 and stats.tokens_in == sum(len(d.input_ids) for d in docs)
    assert stats.balanced


def test_hand_computed_buffer_and_carry():
    # Wrapped docs: 5, 7, 14, 4, 9 tokens (3, 5, 12, 2, 7 + BOS + EOS), pack length 8.
    docs = [Document(np.arange(1, n + 1, dtype=np.uint32), "d") for n in (3, 5, 12, 2, 7)]
    got, stats = pack_documents(docs, PackOptions(pack_length=8, min_length=2, bos_id=100, eos_id=101))
    samples = [(s.input_ids.tolist(), s.indices.tolist()) for _, s in got]
    assert samples == [
        ([100, 1, 2, 3, 101, 100, 1, 2], [[0, 5], [5, 8]]),
        ([3, 4, 5, 101, 100, 1, 2, 3], [[0, 4], [4, 8]]),  # carried tail of doc 2 is its own segment
        ([4, 5, 6, 7, 8, 9, 10, 11], [[0, 8]]),  # doc 3 longer than the pack: its own sample
        ([12, 101, 100, 1, 2, 101, 100, 1], [[0, 2], [2, 6], [6, 8]]),
    ]
    assert stats.dropped_final_buffer == {"": 7}  # the last partial buffer is never emitted
    assert (stats.tokens_in, stats.special_tokens_added, stats.tokens_out) == (29, 10, 32)


def test_short_tails_dropped_and_counted():
    docs = [Document(np.arange(1, 11, dtype=np.uint32), "d")] * 2  # 10 tokens each, pack 8
    got, stats = pack_documents(docs, PackOptions(pack_length=8, min_length=3))
    # Each document overflows by 2 < min_length: both tails are dropped.
    assert [s.input_ids.tolist() for _, s in got] == [list(range(1, 9))] * 2
    assert (stats.dropped_short_tail, stats.dropped_tails) == (4, 2)
    assert stats.balanced


def test_document_much_longer_than_pack_length_with_middle_token():
    doc = Document(np.arange(1, 21, dtype=np.uint32), "book")  # 20 tokens, pack 8
    got, stats = pack_documents([doc], PackOptions(pack_length=8, mos_id=99))
    assert [s.input_ids.tolist() for _, s in got] == [
        [1, 2, 3, 4, 5, 6, 7, 8],
        [99, 9, 10, 11, 12, 13, 14, 15],  # every continuation starts with the middle token
    ]
    assert stats.dropped_final_buffer == {"": 6}  # [99, 16, 17, 18, 19, 20]


def test_split_by_lengths_hand_computed():
    # 37 tokens with split (16, 4), pack 16: two 16-chunks, one 4-chunk, 1 token dropped.
    docs = [Document(np.arange(1, 38, dtype=np.uint32), "code"),
            Document(np.arange(101, 104, dtype=np.uint32), "code"),  # 3 < 4: dropped whole
            Document(np.arange(201, 213, dtype=np.uint32), "code")]  # 12: three 4-chunks
    got, stats = pack_documents(docs, PackOptions(pack_length=16, split_lengths=(16, 4)))
    assert [(sub, s.input_ids.tolist(), s.indices.tolist(), s.domain) for sub, s in got] == [
        ("16-16", list(range(1, 17)), [[0, 16]], "16-16"),
        ("16-16", list(range(17, 33)), [[0, 16]], "16-16"),
        ("4-16", [33, 34, 35, 36] + list(range(201, 213)), [[0, 4], [4, 8], [8, 12], [12, 16]], "4-16"),
    ]
    assert stats.dropped_below_split == 1 + 3 and stats.documents_below_split == 1
    assert stats.samples_out == {"16-16": 2, "4-16": 1} and stats.balanced


def test_mask_inserted_tokens_are_zero():
    doc = Document(np.arange(1, 7, dtype=np.uint32), "chat", np.ones(6, dtype=np.uint8))
    got, _ = pack_documents([doc, doc], PackOptions(pack_length=10, bos_id=BOS, eos_id=EOS, mos_id=BOS))
    (_, sample), = got
    assert sample.input_ids.tolist() == [BOS, 1, 2, 3, 4, 5, 6, EOS, BOS, 1]
    assert sample.mask.tolist() == [0, 1, 1, 1, 1, 1, 1, 0, 0, 1]


def test_mask_consistency_is_enforced():
    plain = Document(np.arange(1, 5, dtype=np.uint32), "d")
    masked = Document(np.arange(1, 5, dtype=np.uint32), "d", np.ones(4, dtype=np.uint8))
    with pytest.raises(ValueError, match="lacks a mask"):
        pack_documents([masked, plain], PackOptions(pack_length=4))
    with pytest.raises(ValueError, match="has a mask"):
        pack_documents([plain, masked], PackOptions(pack_length=4))
    with pytest.raises(ValueError, match="mask length 3"):
        pack_documents([Document(masked.input_ids, "d", np.ones(3, dtype=np.uint8))], PackOptions(pack_length=4))


def test_invalid_options():
    with pytest.raises(ValueError):
        PackOptions(pack_length=8, min_length=0)
    with pytest.raises(ValueError):
        PackOptions(pack_length=0)


# ---- MDS output, CLI and the data adapter ----------------------------------------------------

def write_raw(folder, docs):
    columns = dict(RAW_COLUMNS, **({"mask": "ndarray:uint8"} if docs[0].mask is not None else {}))
    with MDSWriter(out=str(folder), columns=columns, compression=None) as writer:
        for d in docs:
            sample = {"input_ids": d.input_ids, "length": len(d.input_ids), "domain": d.domain}
            if d.mask is not None:
                sample["mask"] = d.mask
            writer.write(sample)


def read_all(folder):
    data = LocalDataset(str(folder))
    return [data[i] for i in range(len(data))]


@pytest.mark.parametrize("with_mask", [False, True])
def test_pack_mds_writes_prolong_format(tmp_path, with_mask):
    docs = random_docs(seed=3, n=80, max_len=300, with_mask=with_mask)
    write_raw(tmp_path / "raw", docs)
    opts = PackOptions(pack_length=64, min_length=8, split_lengths=(256, 64), bos_id=BOS, eos_id=EOS)
    stats = pack_mds([tmp_path / "raw"], tmp_path / "packed", opts, progress=False)
    expected, _ = pack_documents(docs, opts)
    assert stats.balanced and sum(stats.samples_out.values()) == len(expected)
    for subset in ("256-64", "64-64"):
        index = json.loads((tmp_path / "packed" / subset / "index.json").read_text())
        shard = index["shards"][0]
        columns = dict(zip(shard["column_names"], shard["column_encodings"]))
        assert columns == dict(RAW_COLUMNS, indices="ndarray:uint32", **({"mask": "ndarray:uint8"} if with_mask else {}))
        assert shard["compression"] is None and shard["size_limit"] == 1 << 26
        rows = read_all(tmp_path / "packed" / subset)
        want = [s for sub, s in expected if sub == subset]
        assert len(rows) == len(want) > 0
        for row, s in zip(rows, want):
            assert row["input_ids"].dtype == np.uint32 and np.array_equal(row["input_ids"], s.input_ids)
            assert row["indices"].shape == s.indices.shape and np.array_equal(row["indices"], s.indices)
            assert row["length"] == 64 and row["domain"] == subset
            assert ("mask" in row) == with_mask
            if with_mask:
                assert row["mask"].dtype == np.uint8 and np.array_equal(row["mask"], s.mask)


def test_cli_pack_and_adapter_reads_output(tmp_path, capsys):
    from prolong_nemo.data.mds import MdsDomain
    from prolong_nemo.data.packing import build_row

    docs = random_docs(seed=5, n=40, max_len=200, with_mask=True)
    write_raw(tmp_path / "raw", docs)
    rc = cli_main(["data", "pack", str(tmp_path / "raw"), "-o", str(tmp_path / "out"), "-l", "128",
                   "-s", "16", "-T", "llama3", "--use-for-mos", "bos", "--no-progress"])
    assert rc == 0
    report = capsys.readouterr().out
    assert "accounting: balanced" in report and "final partial buffer" in report
    expected, _ = pack_documents(docs, PackOptions(pack_length=128, min_length=16, bos_id=BOS,
                                                   eos_id=EOS, mos_id=BOS))
    domain = MdsDomain(str(tmp_path / "out"))  # the training adapter, no conversion
    assert len(domain) == len(expected) > 0
    for i, (_, s) in enumerate(expected):
        sample = domain[i]
        assert np.array_equal(sample.input_ids, s.input_ids) and np.array_equal(sample.indices, s.indices)
        assert np.array_equal(sample.mask, s.mask) and sample.domain == "a"
        row = build_row(sample.input_ids, sample.indices, sample.mask)
        # targets: inside each document, next tokens whose mask is 1
        n_targets = sum(int(s.mask[a + 1:b].sum()) for a, b in s.indices.tolist())
        assert row["loss_mask"].sum() == n_targets


def test_refuses_mixed_mask_inputs_and_existing_output(tmp_path):
    write_raw(tmp_path / "plain", random_docs(1, 5, 50))
    write_raw(tmp_path / "chat", random_docs(2, 5, 50, with_mask=True))
    with pytest.raises(ValueError, match="mask"):
        pack_mds([tmp_path / "plain", tmp_path / "chat"], tmp_path / "out", PackOptions(pack_length=8))
    assert not (tmp_path / "out").exists()
    pack_mds([tmp_path / "plain"], tmp_path / "out", PackOptions(pack_length=8), progress=False)
    with pytest.raises(FileExistsError):
        pack_mds([tmp_path / "plain"], tmp_path / "out", PackOptions(pack_length=8))
    pack_mds([tmp_path / "plain"], tmp_path / "out", PackOptions(pack_length=8), overwrite=True, progress=False)


def test_megatron_mixture_over_packed_subsets(tmp_path):
    """The whole adapter stack (Mixture -> Megatron BlendedDataset -> rows) reads packer output."""
    from prolong_nemo.data.dataset import build_datasets, collate, dataset_config
    from prolong_nemo.data.mixture import Mixture

    docs = random_docs(seed=9, n=60, max_len=400, domains=("book", "web"))
    write_raw(tmp_path / "raw", docs)
    opts = PackOptions(pack_length=128, split_by_domain=True, bos_id=BOS, eos_id=EOS)
    stats = pack_mds([tmp_path / "raw"], tmp_path / "packed", opts, progress=False)
    expected, _ = pack_documents(docs, opts)
    by_subset = {s: [p for sub, p in expected if sub == s] for s in ("book", "web")}
    assert stats.samples_out == {s: len(v) for s, v in by_subset.items()}
    mixture = Mixture.parse({str(tmp_path / "packed" / "book"): 0.6, str(tmp_path / "packed" / "web"): 0.4})
    train, *_ = build_datasets(dataset_config(mixture, sequence_length=128), [12, 0, 0])
    for i in range(12):
        dataset_id, sample_id = train.dataset_index[i], train.dataset_sample_index[i]
        domain_ds = train.datasets[dataset_id]
        packed = by_subset[Path(domain_ds.dataset_path).name][domain_ds.sample_index(sample_id)]
        batch = collate([train[i]])
        real = [(a, b) for a, b in packed.indices.tolist() if b - a > 1]
        assert int(batch["loss_mask"].sum()) == sum(b - a - 1 for a, b in real)
        assert sorted(batch["tokens"][0][batch["tokens"][0] != 0].tolist()) == sorted(
            t for a, b in real for t in packed.input_ids[a:b].tolist() if t != 0)


# ---- hostile / careless inputs (issue 13, items 4, 6, 7) -------------------------------------

def write_raw_columns(folder, samples, columns):
    """Raw MDS documents with the given column encodings (e.g. int64 ids, an int8 mask)."""
    with MDSWriter(out=str(folder), columns=columns, compression=None) as writer:
        for sample in samples:
            writer.write(sample)


def files_under(root):
    return {p for p in Path(root).rglob("*") if p.is_file()}


@pytest.mark.parametrize("bad_domain", ["../../escaped", "ABS", "..", ".", "a/b", ""])
def test_split_by_domain_refuses_unsafe_domain_and_writes_nothing_outside_output(tmp_path, bad_domain):
    from prolong_nemo.errors import DataError

    if bad_domain == "ABS":
        bad_domain = str(tmp_path / "abs" / "escaped")
    docs = [Document(np.arange(1, 40, dtype=np.uint32), "good"),
            Document(np.arange(1, 40, dtype=np.uint32), bad_domain)]
    write_raw(tmp_path / "raw", docs)
    out = tmp_path / "deep" / "er" / "out"
    before = files_under(tmp_path)
    with pytest.raises(DataError, match=r"raw sample 1: domain .* is not one safe path component") as err:
        pack_mds([tmp_path / "raw"], out, PackOptions(pack_length=8, split_by_domain=True), progress=False)
    assert repr(bad_domain) in str(err.value) and "\n" not in str(err.value)
    assert files_under(tmp_path) == before  # nothing written anywhere, inside -o or outside it
    assert not (tmp_path / "abs").exists() and not (tmp_path / "escaped").exists()
    # the same data without splitting by domain is fine: the domain is then only a column value
    pack_mds([tmp_path / "raw"], out, PackOptions(pack_length=8), progress=False)
    assert {p.parent for p in files_under(tmp_path) - before} == {out}


@pytest.mark.parametrize("encoding, ids, message", [
    ("ndarray:int64", np.array([5, -1, 7], dtype=np.int64), r"token id -1 at position 1 is outside \[0, 4294967296\)"),
    ("ndarray:int64", np.array([5, 1 << 32, 7], dtype=np.int64), r"token id 4294967296 at position 1"),
    ("ndarray:float32", np.array([5, 1.5, 7], dtype=np.float32), r"input_ids must be integers, got float32"),
    ("ndarray:uint32", np.array([5, 128256, 7], dtype=np.uint32), r"token id 128256 at position 1 is outside \[0, 128256\)"),
])
def test_pack_refuses_token_ids_that_do_not_fit(tmp_path, encoding, ids, message):
    from prolong_nemo.errors import DataError

    good = {"input_ids": np.array([1, 2, 3], dtype=ids.dtype), "length": 3, "domain": "a"}
    write_raw_columns(tmp_path / "raw", [good, {"input_ids": ids, "length": 3, "domain": "a"}],
                      dict(RAW_COLUMNS, input_ids=encoding))
    opts = PackOptions(pack_length=4, **({"vocab_size": 128256} if "128256" in message else {}))
    bad = 0 if ids.dtype.kind == "f" else 1  # a float column holds floats in every sample: the first is refused
    with pytest.raises(DataError, match=rf"raw sample {bad}: {message}") as err:
        pack_mds([tmp_path / "raw"], tmp_path / "out", opts, progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_pack_cli_checks_the_vocabulary(tmp_path, capsys):
    write_raw(tmp_path / "raw", [Document(np.array([1, 2, 128300], dtype=np.uint32), "a")])
    assert cli_main(["data", "pack", str(tmp_path / "raw"), "-o", str(tmp_path / "o1"), "-l", "2", "-T", "llama3",
                     "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'raw'} sample 0: token id 128300 at position 2 is "
                                       "outside [0, 128256)\n")
    assert cli_main(["data", "pack", str(tmp_path / "raw"), "-o", str(tmp_path / "o2"), "-l", "2",
                     "--vocab-size", "1000", "--no-progress"]) == 2
    assert "token id 128300 at position 2 is outside [0, 1000)" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    with pytest.raises(ValueError, match=r"BOS id 128000 is outside the vocabulary \[0, 1000\)"):
        PackOptions(pack_length=2, bos_id=BOS, vocab_size=1000)


@pytest.mark.parametrize("encoding, mask, message", [
    ("ndarray:uint16", np.array([0, 256, 1], dtype=np.uint16), r"mask value 256 at position 1 does not fit uint8"),
    ("ndarray:int8", np.array([0, -1, 1], dtype=np.int8), r"mask must be unsigned integers \(target = mask != 0\), got int8"),
    ("ndarray:float32", np.array([0, 0.5, 1], dtype=np.float32), r"mask must be unsigned integers .*got float32"),
])
def test_pack_refuses_masks_that_do_not_fit(tmp_path, encoding, mask, message):
    from prolong_nemo.errors import DataError

    columns = dict(RAW_COLUMNS, mask=encoding)
    good = {"input_ids": np.array([1, 2, 3], dtype=np.uint32), "length": 3, "domain": "a",
            "mask": np.array([0, 1, 1], dtype=mask.dtype)}
    write_raw_columns(tmp_path / "raw", [good, dict(good, mask=mask)], columns)
    bad = 1 if mask.dtype.kind == "u" else 0  # a signed / float column: every sample is, the first is refused
    with pytest.raises(DataError, match=rf"raw sample {bad}: {message}") as err:
        pack_mds([tmp_path / "raw"], tmp_path / "out", PackOptions(pack_length=4), progress=False)
    assert "\n" not in str(err.value)


def test_pack_never_unpickles_a_pkl_column(tmp_path):
    """Raw MDS columns encoded `pkl` would run code from the data when streaming decodes them
    (issue 13, item 3): the packer checks the index's encodings before reading any sample."""
    from data_fixtures import Exploit

    from prolong_nemo.errors import DataError

    pwned = tmp_path / "pwned"
    sample = {"input_ids": np.array([1, 2, 3], dtype=np.uint32), "length": 3, "domain": "a",
              "extra": Exploit(str(pwned))}
    write_raw_columns(tmp_path / "raw", [sample], dict(RAW_COLUMNS, extra="pkl"))
    assert not pwned.exists()
    with pytest.raises(DataError, match=r"raw/index.json: shard shard.00000.mds: column 'extra' has encoding 'pkl'"):
        pack_mds([tmp_path / "raw"], tmp_path / "out", PackOptions(pack_length=4), progress=False)
    assert not pwned.exists() and not (tmp_path / "out").exists()


def test_pack_refuses_already_packed_input(tmp_path, capsys):
    """Packed samples (an `indices` column) read as raw documents would lose their document
    boundaries: `data pack` refuses them in one line naming the folder, before writing anything."""
    from data_fixtures import write_random_domain

    write_raw(tmp_path / "raw", random_docs(1, 5, 50))
    write_random_domain(tmp_path / "tree" / "book", 3, 64)  # already ProLong-format
    rc = cli_main(["data", "pack", str(tmp_path / "raw"), str(tmp_path / "tree"), "-o", str(tmp_path / "out"),
                   "-l", "16", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err == (f"error: {tmp_path / 'tree' / 'book'}: already packed (its samples have an `indices` column of "
                   "document boundaries, which packing again would drop); use the folder directly as a training "
                   "domain (a data.mixture path) instead of packing it\n")
    assert not (tmp_path / "out").exists()
