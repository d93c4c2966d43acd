"""Output folders of `convert`, `data pack` and `data tokenize`: no input destroyed by --overwrite,
no output lost to a concurrent writer, no window without an output, no leaked partial folders
(issue 13, items 11-14)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prolong_nemo.cli import main as cli_main
from prolong_nemo.convert import ConversionError, outputs
from prolong_nemo.convert.outputs import atomic_output_dir


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder


def _one_error_line(err: str, *paths: Path) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for p in paths:
        assert str(Path(p).absolute()) in lines[0], (p, lines[0])
    return lines[0]


# ---------------------------------------------------------------- 11: --overwrite onto an input


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    from test_convert import make_hf_model

    return make_hf_model(tmp_path_factory.mktemp("model") / "hf")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["equal", "inside", "containing"])
def test_convert_overwrite_refuses_an_output_overlapping_the_input(tmp_path, hf_model, capsys, where):
    import shutil

    src = tmp_path / "models" / "hf"
    shutil.copytree(hf_model, src)
    before = _snapshot(src)
    out = {"equal": src, "inside": src / "mg", "containing": tmp_path / "models"}[where]
    if where == "inside":
        _write(out, "old.txt", "previous output")
    rc = cli_main(["convert", "hf-to-megatron", str(src), str(out), "--overwrite", "--quiet", "--no-fsync"])
    assert rc == 2
    line = _one_error_line(capsys.readouterr().err, src, out)
    assert "overlaps" in line
    now = _snapshot(src)
    if where == "inside":
        assert now.pop("mg/old.txt") == b"previous output"
    assert now == before


def test_export_overwrite_refuses_the_checkpoint_and_tokenizer_folders(tmp_path, hf_model, capsys):
    assert cli_main(["convert", "hf-to-megatron", str(hf_model), str(tmp_path / "mg"), "--quiet", "--no-fsync"]) == 0
    before = _snapshot(tmp_path / "mg")
    iter_dir = tmp_path / "mg" / "iter_0000000"
    for out, extra in [(iter_dir, []), (tmp_path / "mg", []),
                       (tmp_path / "tok", ["--tokenizer", str(_write(tmp_path / "tok" / "t", "tokenizer.json", "{}"))])]:
        args = ["convert", "megatron-to-hf", str(iter_dir), str(out), "--overwrite", "--quiet", "--no-fsync", *extra]
        assert cli_main(args) == 2
        _one_error_line(capsys.readouterr().err, out)
    assert _snapshot(tmp_path / "mg") == before
    assert (tmp_path / "tok" / "t" / "tokenizer.json").read_text() == "{}"


def test_tokenize_and_pack_overwrite_refuse_their_inputs(tmp_path, capsys):
    line = json.dumps({"text": "Hello world, " * 20}) + "\n"
    raw_in = _write(tmp_path / "text", "web.jsonl", line)
    # tokenize: output equal to the input folder, and output containing it
    for out in (raw_in, tmp_path):
        rc = cli_main(["data", "tokenize", str(raw_in), "-o", str(out), "-j", "1", "--overwrite", "--no-progress"])
        assert rc == 2
        _one_error_line(capsys.readouterr().err, raw_in, out)
        assert (raw_in / "web.jsonl").read_text() == line
    # a file input inside the output folder
    rc = cli_main(["data", "tokenize", str(raw_in / "web.jsonl"), "-o", str(raw_in), "-j", "1", "--overwrite",
                   "--no-progress"])
    assert rc == 2 and (raw_in / "web.jsonl").is_file()
    _one_error_line(capsys.readouterr().err, raw_in / "web.jsonl", raw_in)

    mds = tmp_path / "mds"
    assert cli_main(["data", "tokenize", str(raw_in), "-o", str(mds), "-j", "1", "--no-progress"]) == 0
    index = (mds / "index.json").read_bytes()
    for out in (mds, mds / "sub", tmp_path):
        rc = cli_main(["data", "pack", str(mds), "-o", str(out), "-l", "4", "--overwrite", "--no-progress"])
        assert rc == 2
        _one_error_line(capsys.readouterr().err, mds, out)
        assert (mds / "index.json").read_bytes() == index
    capsys.readouterr()
    # disjoint folders are still replaced with --overwrite
    _write(tmp_path / "packed", "old.txt", "x")
    assert cli_main(["data", "pack", str(mds), "-o", str(tmp_path / "packed"), "-l", "4", "--overwrite",
                     "--no-progress"]) == 0
    assert (tmp_path / "packed" / "index.json").is_file() and not (tmp_path / "packed" / "old.txt").exists()


# ---------------------------------------------------------------- 12: two writers, one destination


def test_second_finish_onto_the_same_destination_fails_and_cleans_up(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(ConversionError, match="appeared while") as info:
        with atomic_output_dir(dest) as first:
            _write(first, "who", "first")
            with atomic_output_dir(dest) as second:  # started after the first, finishes before it
                assert second != first
                _write(second, "who", "second")
    assert "\n" not in str(info.value) and str(dest) in str(info.value)
    assert (dest / "who").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the loser's partial folder is gone


def test_two_concurrent_conversions_one_wins_one_reports(tmp_path):
    """Two processes finish at the same moment: exactly one succeeds, the other gets one error line."""
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from prolong_nemo.convert.outputs import atomic_output_dir\n"
        "from prolong_nemo.convert import ConversionError\n"
        "dest, go, tag = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]\n"
        "try:\n"
        "    with atomic_output_dir(dest) as tmp:\n"
        "        (tmp / 'who').write_text(tag)\n"
        "        while not go.exists(): time.sleep(0.01)\n"
        "except ConversionError as e:\n"
        "    print('error:', e); sys.exit(2)\n"
    )
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "out"), str(go), tag],
                              stdout=subprocess.PIPE, text=True) for tag in ("a", "b")]
    deadline = time.time() + 60
    while len(list(tmp_path.glob(".out.partial-*"))) < 2 and time.time() < deadline:
        time.sleep(0.05)
    go.touch()
    results = [(p.wait(60), p.stdout.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    winner = "ab"[[rc for rc, _ in results].index(0)]
    assert (tmp_path / "out" / "who").read_text() == winner
    loser_out = [out for rc, out in results if rc == 2][0]
    assert len(loser_out.strip().splitlines()) == 1 and str(tmp_path / "out") in loser_out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "out"]


# ---------------------------------------------------------------- 13: the --overwrite swap


def test_overwrite_never_leaves_the_name_without_an_output(tmp_path, monkeypatch):
    dest = _write(tmp_path / "out", "who", "old")
    seen = []
    real_rmtree = outputs.shutil.rmtree

    def watching_rmtree(path, *args, **kwargs):
        if ".old-" in Path(path).name:  # deleting the previous output: the new one must be in place
            seen.append((dest / "who").read_text() if (dest / "who").exists() else None)
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(outputs.shutil, "rmtree", watching_rmtree)
    with atomic_output_dir(dest, overwrite=True) as tmp:
        _write(tmp, "who", "new")
    assert seen == ["new"]
    (tmp_path / "plain").mkdir()
    assert dest.stat().st_mode == (tmp_path / "plain").stat().st_mode  # a normal folder's permissions
    (tmp_path / "plain").rmdir()
    assert (dest / "who").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_puts_the_old_output_back_when_the_new_one_cannot_move_in(tmp_path, monkeypatch):
    dest = _write(tmp_path / "out", "who", "old")
    real_rename = os.rename

    def failing_rename(src, dst):
        if ".partial-" in Path(src).name:
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(outputs.os, "rename", failing_rename)
    with pytest.raises(ConversionError, match="could not move"):
        with atomic_output_dir(dest, overwrite=True) as tmp:
            _write(tmp, "who", "new")
    assert (dest / "who").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_symlinked_destination_is_refused_and_left_alone(tmp_path):
    real = _write(tmp_path / "real", "who", "old")
    link = tmp_path / "link"
    link.symlink_to(real)
    for overwrite in (True, False):
        with pytest.raises(ConversionError, match="symbolic link") as info:
            with atomic_output_dir(link, overwrite=overwrite) as tmp:
                _write(tmp, "who", "new")
        assert str(link) in str(info.value) and str(real) in str(info.value) and "\n" not in str(info.value)
    assert link.is_symlink() and (link / "who").read_text() == "old"
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConversionError, match="symbolic link"):
        with atomic_output_dir(dangling) as tmp:
            _write(tmp, "who", "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "link", "real"]


# ---------------------------------------------------------------- 14: stale partial folders


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_partial_folders_of_dead_processes_are_removed(tmp_path, caplog):
    dest = _write(tmp_path / "out", "who", "old")
    dead, alive = _dead_pid(), os.getppid()
    stale = [_write(tmp_path / f".out.partial-{dead}", "big.safetensors", "x"),
             _write(tmp_path / f".out.partial-{dead}-abc123", "big.safetensors", "x"),
             _write(tmp_path / f".out.old-{dead}", "who", "older")]
    reused = _write(tmp_path / f".out.partial-{alive}", "big.safetensors", "x")
    # last written long before the live process with that PID started: PID reuse, stale too
    os.utime(reused, (1_000_000_000, 1_000_000_000))
    running = _write(tmp_path / f".out.partial-{alive}-live", "big.safetensors", "x")  # a live writer's
    other = _write(tmp_path / f".other.partial-{dead}", "f", "x")  # another destination's: not ours to judge
    with caplog.at_level(logging.INFO, logger="prolong_nemo.convert.outputs"):
        with atomic_output_dir(dest, overwrite=True) as tmp:
            _write(tmp, "who", "new")
    assert not any(p.exists() for p in stale + [reused])
    assert running.is_dir() and other.is_dir() and (dest / "who").read_text() == "new"
    lines = [r.getMessage() for r in caplog.records if "stale" in r.getMessage()]
    assert len(lines) == 1 and "removed 4 stale" in lines[0] and str(stale[0]) in lines[0], lines


def test_old_output_left_by_a_kill_mid_swap_is_kept_when_it_is_the_only_copy(tmp_path, caplog):
    dead = _dead_pid()
    previous = _write(tmp_path / f".out.old-{dead}", "who", "previous")  # killed between the two renames
    with caplog.at_level(logging.INFO, logger="prolong_nemo.convert.outputs"):
        with atomic_output_dir(tmp_path / "out") as tmp:
            _write(tmp, "who", "new")
    assert (previous / "who").read_text() == "previous"
    assert any("kept" in r.getMessage() and str(previous) in r.getMessage() for r in caplog.records)
