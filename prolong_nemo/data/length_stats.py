"""Document-length statistics of a mixture: what a packed sample's attention FLOPs depend on.

Causal attention over document-masked samples costs sum over documents of l(l+1)/2 query-key
pairs (`prolong_nemo.model.flops`), so a sample's cost needs its tokens T = sum l and sum l^2.
The mixture draws each sample from domain d with probability w_d (its normalized proportion;
one MDS sample is one training row), so per sample

    E[T] = sum_d w_d * mean_d(T),    E[sum l^2] = sum_d w_d * mean_d(sum l^2)

`mixture_length_stats` estimates the means from at most `max_samples` samples in all, split
over the domains by proportion (at least `MIN_SAMPLES_PER_DOMAIN` each, evenly spaced through
each domain); l are the trained segments of `packing.document_segments` (documents of at least
two tokens; without document masking the whole sample is one segment, sum l^2 = T^2).

Where the data cannot be read (not downloaded, remote, synthetic: planning on a laptop)
`default_length_stats` stands in, a documented distribution per stage shaped like ProLong's
mixes (recipes/stage_*.yaml, from the released training scripts):
  64k   60% of samples one long document filling the sample (code repositories, books:
        thestackv1_concat_by_repo-65536 0.30 + book-65536 0.30), 40% short documents;
  512k  20% one 512K document (thestackv1_concat_by_repo-524288 0.15 + book-524288 0.05),
        40% 64K documents (the -65536 domains, 8 per sample: 0.15 + 0.25), 40% short documents;
  sft   short documents only (UltraChat conversations);
  other stages: as 64k, with long documents of the sequence length.
Short documents (fineweb, stackexchange, wiki, arxiv, ...) are taken as lengths uniform in
[1,024, 4,096] tokens by count: a sample of T tokens packed with them has
sum l^2 = T * E[l^2] / E[l] = T * 2(a^2 + ab + b^2) / (3(a + b)) = T * 2,867.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from prolong_nemo.data.mds import LLAMA3_VOCAB_SIZE, DataError, MdsDomain, mds_document_bounds
from prolong_nemo.data.mixture import Mixture
from prolong_nemo.data.packing import document_segments

MAX_SAMPLES = 128
MIN_SAMPLES_PER_DOMAIN = 2
SHORT_DOCS = (1024, 4096)  # uniform document lengths (by count) of the short domains
LONG = None  # a document as long as the sample


@dataclass(frozen=True)
class LengthStats:
    """Expected tokens and sum of squared document lengths per sample, and where they come from."""

    tokens: float
    sum_sq: float
    source: str  # "data" or "default"
    detail: str
    samples_read: int = 0

    @property
    def mean_doc_length(self) -> float:
        """Token-weighted mean document length, sum l^2 / sum l: the length of a uniform packing
        with the same attention cost."""
        return self.sum_sq / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict:
        return {"tokens_per_sample": self.tokens, "sum_sq_per_sample": self.sum_sq,
                "mean_doc_length": self.mean_doc_length, "source": self.source, "detail": self.detail,
                "samples_read": self.samples_read}


def short_doc_ratio(lo: int = SHORT_DOCS[0], hi: int = SHORT_DOCS[1]) -> float:
    """E[l^2] / E[l] for lengths uniform in [lo, hi]: sum l^2 per token of a packed sample."""
    return 2.0 * (lo * lo + lo * hi + hi * hi) / (3.0 * (lo + hi))


# (share of samples, document length: LONG = the sample length, "short" = SHORT_DOCS, or tokens)
DEFAULT_MIXES: dict[str, tuple[tuple[float, int | str | None], ...]] = {
    "64k": ((0.6, LONG), (0.4, "short")),
    "512k": ((0.2, LONG), (0.4, 65536), (0.4, "short")),
    "sft": ((1.0, "short"),),
}


def default_length_stats(stage: str, sequence_length: int, *, document_masking: bool = True,
                         reason: str = "") -> LengthStats:
    """The documented ProLong-like distribution of `stage` for samples of `sequence_length` tokens."""
    mix = DEFAULT_MIXES.get(stage, DEFAULT_MIXES["64k"])
    t = float(sequence_length)
    sum_sq = 0.0
    parts = []
    for share, doc in mix:
        length = t if doc is LONG else short_doc_ratio() if doc == "short" else min(float(doc), t)
        sum_sq += share * t * length
        parts.append(f"{100 * share:.0f}% " + ("short 1-4K" if doc == "short" else f"{length / 1024:,.0f}K")
                     + " docs")
    if not document_masking:
        sum_sq = t * t
    detail = (f"default {stage if stage in DEFAULT_MIXES else '64k'} mix: {', '.join(parts)}"
              + ("" if document_masking else " (no document masking: one segment per sample)")
              + (f"; {reason}" if reason else ""))
    return LengthStats(t, sum_sq, "default", detail)


def sample_moments(length: int, indices: np.ndarray | None, document_masking: bool = True) -> tuple[int, int]:
    """(sum l, sum l^2) over a sample's trained segments."""
    starts, ends = document_segments(length, indices, document_masking)
    seg = (ends - starts).astype(np.int64)
    return int(seg.sum()), int((seg * seg).sum())


def _domain_means(path: str, n: int, document_masking: bool, vocab_size: int,
                  cache_dir: str | None) -> tuple[float, float, int]:
    domain = MdsDomain(path, cache_dir=cache_dir, vocab_size=vocab_size)
    picks = np.unique(np.linspace(0, len(domain) - 1, min(n, len(domain))).astype(int))
    # the `length` / `indices` columns only: a 512K sample's tokens are never decoded
    moments = np.array([sample_moments(*mds_document_bounds(domain, int(i)), document_masking)
                        for i in picks], dtype=np.float64)
    return float(moments[:, 0].mean()), float(moments[:, 1].mean()), len(picks)


def mixture_length_stats(domains: Sequence[tuple[str, float]] | Mixture, *, document_masking: bool = True,
                         max_samples: int = MAX_SAMPLES, vocab_size: int = LLAMA3_VOCAB_SIZE,
                         cache_dir: str | None = None) -> LengthStats:
    """Estimate from the data (module docstring); raises DataError where a domain cannot be read."""
    mixture = domains if isinstance(domains, Mixture) else Mixture.parse(list(domains))
    tokens = sum_sq = 0.0
    read = 0
    for d, w in zip(mixture.active, mixture.weights):
        n = max(MIN_SAMPLES_PER_DOMAIN, round(max_samples * w))
        t, s, k = _domain_means(d.path, n, document_masking, vocab_size, cache_dir)
        tokens, sum_sq, read = tokens + w * t, sum_sq + w * s, read + k
    return LengthStats(tokens, sum_sq, "data", f"read {read} samples of {len(mixture.active)} domains", read)


def length_stats(domains: Sequence[tuple[str, float]], *, stage: str, sequence_length: int,
                 document_masking: bool = True, max_samples: int = MAX_SAMPLES) -> LengthStats:
    """From the data where every domain is a readable local folder, else the stage's default.

    Remote domains are not downloaded for this (no cache is given): they take the default.
    """
    try:
        return mixture_length_stats(domains, document_masking=document_masking, max_samples=max_samples)
    except (DataError, OSError) as e:
        return default_length_stats(stage, sequence_length, document_masking=document_masking,
                                    reason=f"data not read ({str(e).splitlines()[0]})")
