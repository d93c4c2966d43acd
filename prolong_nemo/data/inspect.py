"""Validate and describe a domain folder or a mixture: samples, tokens, documents, CP padding.

Mixture proportions follow the one rule `plan` applies to a recipe's data.mixture
(`Mixture.checked`: finite, >= 0, summing to 1; nothing normalised). A remote domain (s3://,
gs://, hf:// ..., read through mosaicml-streaming's downloaders) needs --cache-dir, the local
folder its index.json and shards are downloaded to.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm import tqdm

from prolong_nemo.data.mds import LLAMA3_VOCAB_SIZE, MdsDomain, is_remote
from prolong_nemo.data.mixture import Mixture
from prolong_nemo.data.packing import (UNCOVERED_WARN_SHARE, PackingConfig, check_mask, document_segments,
                                       padded_lengths, uncovered_tokens, uncovered_warning)
from prolong_nemo.errors import DataError

PERCENTILES = (5, 25, 50, 75, 95, 100)


@dataclass
class DomainReport:
    path: str
    proportion: float  # normalized share of samples in the mixture
    samples: int = 0
    samples_read: int = 0
    tokens: int = 0
    documents: int = 0
    dropped_segments: int = 0  # documents of <= 1 token: no target, not in the row
    targets: int = 0
    padding: int = 0
    with_mask: int = 0
    uncovered_tokens: int = 0  # in no document of `indices`: never fed to training
    doc_length_percentiles: dict[str, int] = field(default_factory=dict)

    @property
    def padding_overhead(self) -> float:
        return self.padding / max(self.tokens, 1)

    @property
    def uncovered_share(self) -> float:
        return self.uncovered_tokens / max(self.tokens, 1)


def inspect_domain(path: str, proportion: float, packing: PackingConfig, *, max_samples: int | None = None,
                   vocab_size: int = LLAMA3_VOCAB_SIZE, cache_dir: str | None = None,
                   progress: bool = True) -> tuple[DomainReport, np.ndarray]:
    """Read (and so validate) the domain's samples; return the report and all document lengths."""
    domain = MdsDomain(path, cache_dir=cache_dir, vocab_size=vocab_size)
    n = len(domain)
    picks = np.arange(n) if not max_samples or max_samples >= n else np.linspace(0, n - 1, max_samples).astype(int)
    report = DomainReport(path, proportion, samples=n, samples_read=len(picks))
    lengths = []
    for i in tqdm(picks, desc=os.path.basename(path), disable=not progress, unit="sample"):
        sample = domain[int(i)]
        check_mask(sample.mask, f"{path}: sample {int(i)}")
        starts, ends = document_segments(len(sample.input_ids), sample.indices, True)
        n_docs = 1 if sample.indices is None else len(sample.indices)
        seg = ends - starts
        report.tokens += len(sample.input_ids)
        report.documents += n_docs
        report.dropped_segments += n_docs - len(seg)
        report.padding += int(padded_lengths(seg, packing).sum() - seg.sum())
        report.with_mask += sample.mask is not None
        report.uncovered_tokens += uncovered_tokens(len(sample.input_ids), sample.indices)
        report.targets += int(seg.sum() - len(seg)) if sample.mask is None else _masked_targets(sample.mask, starts, ends)
        lengths.append(seg)
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    if len(all_lengths):
        report.doc_length_percentiles = {f"p{p}": int(np.percentile(all_lengths, p)) for p in PERCENTILES}
    return report, all_lengths


def _masked_targets(mask: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> int:
    # a target is token t+1 of the same document with mask 1: every token but each document's first
    keep = mask.astype(bool).copy()
    keep[starts] = False
    covered = np.zeros(len(mask) + 1, np.int64)
    np.add.at(covered, starts, 1)
    np.add.at(covered, ends, -1)
    return int((keep & (np.cumsum(covered)[:-1] > 0)).sum())


def inspect_mixture(mixture: Mixture, packing: PackingConfig, **kwargs) -> tuple[list[DomainReport], dict]:
    """Every domain of a mixture whose proportions sum to 1 (`Mixture.require_sum_one`)."""
    total = sum(d.proportion for d in mixture.require_sum_one().domains)
    reports, lengths = [], {}
    for d in mixture.domains:
        report, doc_lengths = inspect_domain(d.path, d.proportion / total, packing, **kwargs)
        reports.append(report)
        lengths[d.name] = doc_lengths
    return reports, lengths


def effective_mixture(reports: list[DomainReport], train_samples: int | None) -> list[dict]:
    """Share of samples and of tokens per domain, and epochs over each domain for a run."""
    tokens_per_sample = [r.tokens / max(r.samples_read, 1) for r in reports]
    token_mass = [r.proportion * t for r, t in zip(reports, tokens_per_sample)]
    rows = []
    for r, mass in zip(reports, token_mass):
        row = {"domain": os.path.basename(r.path), "sample_share": r.proportion,
               "token_share": mass / max(sum(token_mass), 1e-12)}
        if train_samples:
            row["epochs"] = r.proportion * train_samples / r.samples
        rows.append(row)
    return rows


def plot_histograms(lengths: dict[str, np.ndarray], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nonempty = {k: v for k, v in lengths.items() if len(v)}
    top = max(int(v.max()) for v in nonempty.values())
    bins = np.logspace(np.log10(2), np.log10(max(top, 4)), 50)
    fig, ax = plt.subplots(figsize=(9, 5))
    for name, v in nonempty.items():
        ax.hist(v, bins=bins, histtype="step", linewidth=1.5, label=f"{name} ({len(v)} docs)")
    ax.set(xscale="log", xlabel="document length (tokens)", ylabel="documents",
           title="Document lengths per domain")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def format_report(reports: list[DomainReport], effective: list[dict], packing: PackingConfig) -> str:
    head = (f"{'domain':32s} {'samples':>8s} {'tokens':>12s} {'docs':>8s} {'p50':>7s} {'p95':>8s} "
            f"{'max':>8s} {'share':>6s} {'tok%':>6s} {'pad%':>6s}" + (" epochs" if "epochs" in effective[0] else ""))
    lines = [head, "-" * len(head)]
    for r, e in zip(reports, effective):
        p = r.doc_length_percentiles
        line = (f"{os.path.basename(r.path)[:32]:32s} {r.samples:8d} {r.tokens:12d} {r.documents:8d} "
                f"{p.get('p50', 0):7d} {p.get('p95', 0):8d} {p.get('p100', 0):8d} {e['sample_share']:6.3f} "
                f"{100 * e['token_share']:6.2f} {100 * r.padding_overhead:6.3f}")
        lines.append(line + (f" {e['epochs']:6.2f}" if "epochs" in e else ""))
    tokens, padding = sum(r.tokens for r in reports), sum(r.padding for r in reports)
    dropped = sum(r.dropped_segments for r in reports)
    lines.append(f"CP padding at cp_size={packing.cp_size} (segments to multiples of {packing.segment_multiple}): "
                 f"{padding} tokens = {100 * padding / max(tokens, 1):.3f}% of {tokens} read tokens; "
                 f"{dropped} one-token documents carry no target")
    uncovered = sum(r.uncovered_tokens for r in reports)
    lines.append(f"tokens in no document (indices), never trained: {uncovered} = "
                 f"{100 * uncovered / max(tokens, 1):.3f}% of {tokens} read tokens")
    lines += ["warning: " + uncovered_warning(os.path.basename(r.path), r.uncovered_tokens, r.tokens)
              for r in reports if r.uncovered_share > UNCOVERED_WARN_SHARE]
    if any(r.samples_read < r.samples for r in reports):
        lines.append("(statistics over an evenly spaced subset: --max-samples)")
    return "\n".join(lines)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("targets", nargs="+", help="domain folders (local or remote: s3://, gs://, hf:// ...), "
                        "'folder=proportion' items, or a JSON/YAML mixture file ({folder: proportion}); "
                        "proportions must sum to 1 as in a recipe's data.mixture (bare folders: equal shares)")
    parser.add_argument("--root", help="directory that relative domain folders are in")
    parser.add_argument("--cp-size", type=int, default=8, help="context-parallel size for the padding estimate")
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--max-samples", type=int, help="read at most this many samples per domain")
    parser.add_argument("--train-samples", type=int, help="samples a run draws: report epochs per domain")
    parser.add_argument("--vocab-size", type=int, default=LLAMA3_VOCAB_SIZE)
    parser.add_argument("--cache-dir", help="local folder remote domains are downloaded to (required for them)")
    parser.add_argument("--png", default="doc_lengths.png", help="histogram of document lengths per domain")
    parser.add_argument("--json", help="also write the report as JSON here")
    parser.set_defaults(func=run)


def load_mixture(targets: list[str], root: str | None) -> Mixture:
    if len(targets) == 1 and targets[0].endswith((".json", ".yaml", ".yml")) and os.path.isfile(targets[0]):
        from omegaconf import OmegaConf

        spec = OmegaConf.to_container(OmegaConf.load(targets[0]))
        return Mixture.checked(spec.get("mixture", spec) if isinstance(spec, dict) else spec, root=root,
                               what=f"{targets[0]}: mixture")
    return Mixture.checked(targets, root=root)


def refuse_remote_without_cache(mixture: Mixture, cache_dir: str | None) -> None:
    """Before any domain is read: a remote domain needs the local folder streaming downloads to."""
    remote = [d.path for d in mixture.domains if is_remote(d.path)]
    if remote and not cache_dir:
        raise DataError(f"{remote[0]}: a remote domain: pass --cache-dir DIR (the local folder "
                        "mosaicml-streaming downloads its index.json and shards to)")


def run(args: argparse.Namespace) -> int:
    mixture = load_mixture(args.targets, args.root)
    refuse_remote_without_cache(mixture, args.cache_dir)
    packing = PackingConfig(cp_size=args.cp_size, tp_size=args.tp_size, sequence_parallel=args.sequence_parallel)
    reports, lengths = inspect_mixture(mixture, packing, max_samples=args.max_samples, vocab_size=args.vocab_size,
                                       cache_dir=args.cache_dir)
    effective = effective_mixture(reports, args.train_samples)
    print(format_report(reports, effective, packing))
    plot_histograms(lengths, args.png)
    print(f"document-length histogram: {args.png}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"domains": [asdict(r) | {"padding_overhead": r.padding_overhead,
                                                   "uncovered_share": r.uncovered_share} for r in reports],
                       "effective_mixture": effective, "cp_size": args.cp_size}, f, indent=2)
    return 0
