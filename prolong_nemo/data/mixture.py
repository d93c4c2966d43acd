"""A data mixture: domain folders and their sampling proportions (ProLong's stage mixes).

The proportion rule of a mixture a user writes (a recipe's ``data.mixture``, checked by ``plan``;
``data inspect``'s targets) is ``Mixture.checked``: every proportion a finite number >= 0, not all
zero, no folder twice, and the proportions summing to 1 within ``PROPORTION_SUM_TOLERANCE``.
Nothing is normalised behind the user's back: 3 and 1 is refused, not read as 0.75 / 0.25.
A plain ``Mixture`` (the dataset layer's) only needs non-negative weights; Megatron's blend
normalises those.
"""

from __future__ import annotations

import math
import os
import posixpath
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from prolong_nemo.errors import DataError

def is_remote(path: str) -> bool:
    """An object-store / URL path (s3://, gs://, hf://, ...), which mosaicml-streaming downloads."""
    return urllib.parse.urlparse(path).scheme not in ("", "file")


PROPORTION_SUM_TOLERANCE = 1e-6  # |sum - 1| a written mixture may be off by (rounded shares)
_NOT_GIVEN = object()  # a bare path: no proportion written


@dataclass(frozen=True)
class DomainSpec:
    path: str
    proportion: float

    @property
    def name(self) -> str:
        return os.path.basename(self.path.rstrip("/"))


@dataclass(frozen=True)
class Mixture:
    """Validated domains with non-negative proportions (normalized when blended)."""

    domains: tuple[DomainSpec, ...]

    def __post_init__(self) -> None:
        if not self.domains:
            raise DataError("mixture has no domains")
        seen: dict[str, str] = {}  # resolved folder -> the spelling first listed
        for d in self.domains:
            if not isinstance(d.proportion, (int, float)) or not math.isfinite(d.proportion) or d.proportion < 0:
                raise DataError(f"{d.path}: proportion must be a finite number >= 0, got {d.proportion!r}")
            first = seen.get(_resolved(d.path))
            if first == d.path:
                raise DataError(f"{d.path}: domain listed twice in the mixture")
            if first is not None:
                raise DataError(f"{first} and {d.path} are the same domain folder: listed twice in the mixture "
                                "(its samples would be trained on twice)")
            seen[_resolved(d.path)] = d.path
        if sum(d.proportion for d in self.domains) <= 0:
            raise DataError("mixture proportions are all zero: nothing to sample")

    @classmethod
    def parse(cls, spec: str | Sequence | Mapping, root: str | None = None) -> "Mixture":
        """From ``{"path": p, ...}``, ``[("path", p), ...]``, ``["path=p", ...]`` or ``"path=p,path=p"``.

        A bare path (no proportion) means proportion 1; when no domain gives one, the n domains
        get equal shares 1/n. Relative paths are joined to ``root``.
        """
        if isinstance(spec, str):
            spec = [s for s in spec.split(",") if s.strip()]
        items = list(spec.items()) if isinstance(spec, Mapping) else [_pair(s) for s in spec]
        bare = 1.0 / len(items) if items and all(p is _NOT_GIVEN for _, p in items) else 1.0
        domains = []
        for path, proportion in items:
            proportion = bare if proportion is _NOT_GIVEN else proportion
            path = str(path).strip()
            if root and not os.path.isabs(path) and not is_remote(path):
                path = os.path.join(root, path)
            try:
                proportion = float(proportion)
            except (TypeError, ValueError):
                raise DataError(f"{path}: proportion {proportion!r} is not a number") from None
            domains.append(DomainSpec(path, proportion))
        return cls(tuple(domains))

    @classmethod
    def checked(cls, spec: str | Sequence | Mapping, root: str | None = None, what: str = "mixture") -> "Mixture":
        """``parse`` under the proportion rule of a written mixture (module docstring): what
        ``data inspect`` reads and what a recipe's ``data.mixture`` must pass. ``what`` names the
        mixture in the error (``"data.mixture"``, ``"<file>: mixture"``)."""
        return cls.parse(spec, root).require_sum_one(what)

    def require_sum_one(self, what: str = "mixture") -> "Mixture":
        """This mixture, if its proportions sum to 1 (within PROPORTION_SUM_TOLERANCE); else a
        one-line DataError listing them."""
        total = sum(d.proportion for d in self.domains)
        if abs(total - 1.0) > PROPORTION_SUM_TOLERANCE:
            listing = ", ".join(f"{d.name}={d.proportion:g}" for d in self.domains)
            raise DataError(f"{what} proportions sum to {total:.10g}, not 1 ({listing}): give each domain its "
                            "share of the samples drawn, the shares summing to 1 (nothing is normalised)")
        return self

    @property
    def active(self) -> tuple[DomainSpec, ...]:
        """Domains that are sampled (proportion > 0)."""
        return tuple(d for d in self.domains if d.proportion > 0)

    @property
    def weights(self) -> list[float]:
        total = sum(d.proportion for d in self.active)
        return [d.proportion / total for d in self.active]

    def blend(self) -> tuple[list[str], list[float] | None]:
        """Megatron's ``blend``: (paths, normalized weights); no weights for a single domain."""
        paths = [d.path for d in self.active]
        return (paths, None) if len(paths) == 1 else (paths, self.weights)


def _resolved(path: str) -> str:
    """One spelling per folder: ``d/good``, ``d/good/``, ``./d/good`` and its absolute path agree."""
    if is_remote(path):
        url = urllib.parse.urlparse(path)
        return f"{url.scheme.lower()}://{url.netloc}{posixpath.normpath('/' + url.path.lstrip('/'))}"
    return os.path.realpath(path)


def _pair(item) -> tuple[str, object]:
    """(path, proportion as given, or _NOT_GIVEN)."""
    if isinstance(item, str):
        path, sep, proportion = item.rpartition("=")
        return (path, proportion) if sep else (item, _NOT_GIVEN)
    if isinstance(item, Mapping):
        return item["path"], item.get("proportion", _NOT_GIVEN)
    path, proportion = item
    return path, proportion
