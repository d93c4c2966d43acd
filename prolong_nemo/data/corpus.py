"""A small real corpus built offline from the running Python installation (demo and tests).

Every machine with the venv has the CPython standard library, which holds genuinely different
kinds of natural data. `build_corpus` turns it into three JSONL files for `prolong-nemo data
tokenize`:

* ``prose.jsonl`` (domain "prose"): the Python reference-manual topics shipped for ``help()``
  (``pydoc_data.topics``), the CPython license text, and the longer module docstrings;
* ``code.jsonl`` (domain "code"): standard-library source files, one file per document (some are
  tens of thousands of tokens, longer than a small pack length);
* ``chat.jsonl`` (domain "chat"): deterministic question/answer dialogues synthesized from
  function docstrings and signatures, e.g. "What does `json.dumps` do?" answered by the
  docstring's first paragraph, then a follow-up about its arguments; every third dialogue starts
  with a system message. Records use the UltraChat / ProLong SFT ``messages`` layout.

Sources are walked in sorted path order and nothing is random, so the corpus is identical on
every run with the same Python version (its content follows that version's stdlib). Test suites
(``test/``, ``idle_test/``...) and ``site-packages`` are excluded.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

EXCLUDED_PARTS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
SYSTEM_PROMPT = "You are a concise assistant who explains Python's standard library."


@dataclass(frozen=True)
class CorpusFiles:
    """Paths of the JSONL files written by `build_corpus`."""

    prose: Path
    code: Path
    chat: Path

    @property
    def pretraining(self) -> tuple[Path, Path]:
        return self.prose, self.code


@dataclass(frozen=True)
class SourceFile:
    module: str  # dotted module name, e.g. "email.utils"
    path: Path
    text: str


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def iter_stdlib_sources() -> Iterator[SourceFile]:
    """Standard-library .py files (no tests, no site-packages) in sorted path order."""
    root = stdlib_dir()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if EXCLUDED_PARTS.intersection(rel.parts) or any(p.startswith("test_") for p in rel.parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts = rel.with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield SourceFile(module, path, text)


def _parse(src: SourceFile) -> ast.Module | None:
    try:
        return ast.parse(src.text)
    except (SyntaxError, ValueError):
        return None


def _take(texts: Iterator[str], max_chars: int) -> list[str]:
    """Texts in order until their total length would pass max_chars (at least one text)."""
    out, total = [], 0
    for text in texts:
        if out and total + len(text) > max_chars:
            break
        out.append(text)
        total += len(text)
    return out


def _prose_texts(min_docstring_chars: int) -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key].strip()
    license_file = stdlib_dir() / "LICENSE.txt"
    if license_file.is_file():
        yield license_file.read_text(encoding="utf-8", errors="replace").strip()
    for src in iter_stdlib_sources():
        tree = _parse(src)
        doc = ast.get_docstring(tree) if tree else None
        if doc and len(doc) >= min_docstring_chars:
            yield doc.strip()


def prose_documents(max_chars: int = 1_000_000, min_docstring_chars: int = 400) -> list[str]:
    """Natural-language documents: reference-manual topics, license, long module docstrings."""
    return _take(_prose_texts(min_docstring_chars), max_chars)


def code_documents(max_chars: int = 1_000_000) -> list[str]:
    """Python source files of the standard library, one per document."""
    return _take((src.text for src in iter_stdlib_sources() if src.text.strip()), max_chars)


def _first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())


def _dialogue(i: int, module: str, fn: ast.FunctionDef, doc: str) -> list[dict]:
    name = f"{module}.{fn.name}"
    args = ast.unparse(fn.args)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if i % 3 == 0 else []
    messages += [
        {"role": "user", "content": f"What does `{name}` do in Python's standard library?"},
        {"role": "assistant", "content": _first_paragraph(doc)},
        {"role": "user", "content": "Which arguments does it take?"},
        {"role": "assistant", "content": f"Its signature is `{fn.name}({args})`." if args
         else f"`{fn.name}()` takes no arguments."},
    ]
    return messages


def chat_dialogues(max_dialogues: int = 400, min_doc_chars: int = 60) -> list[list[dict]]:
    """Q&A dialogues about documented public top-level functions of public modules, in path order."""
    out: list[list[dict]] = []
    for src in iter_stdlib_sources():
        if any(part.startswith("_") for part in src.module.split(".")):
            continue  # private modules make odd questions
        tree = _parse(src)
        for node in tree.body if tree else []:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if doc and len(_first_paragraph(doc)) >= min_doc_chars:
                out.append(_dialogue(len(out), src.module, node, doc))
                if len(out) >= max_dialogues:
                    return out
    return out


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def build_corpus(out_dir: Path, *, max_chars_per_domain: int = 1_000_000,
                 max_dialogues: int = 400) -> CorpusFiles:
    """Write prose.jsonl, code.jsonl and chat.jsonl under `out_dir` (created) and return their paths.

    About 0.25M Llama-3 tokens per pretraining domain at the default 1M characters.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prose = [{"text": t, "domain": "prose"} for t in prose_documents(max_chars_per_domain)]
    code = [{"text": t, "domain": "code"} for t in code_documents(max_chars_per_domain)]
    chat = [{"messages": m, "domain": "chat"} for m in chat_dialogues(max_dialogues)]
    return CorpusFiles(prose=_write_jsonl(out_dir / "prose.jsonl", prose),
                       code=_write_jsonl(out_dir / "code.jsonl", code),
                       chat=_write_jsonl(out_dir / "chat.jsonl", chat))
