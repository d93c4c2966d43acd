"""A data mixture: domain folders and their sampling proportions (ProLong's stage mixes)."""

from __future__ import annotations

import math
import os
import posixpath
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from prolong_nemo.data.mds import DataError, is_remote


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

        A bare path means one domain with proportion 1. Relative paths are joined to ``root``.
        """
        if isinstance(spec, str):
            spec = [s for s in spec.split(",") if s.strip()]
        items = spec.items() if isinstance(spec, Mapping) else (_pair(s) for s in spec)
        domains = []
        for path, proportion in items:
            path = str(path).strip()
            if root and not os.path.isabs(path) and not is_remote(path):
                path = os.path.join(root, path)
            try:
                proportion = float(proportion)
            except (TypeError, ValueError):
                raise DataError(f"{path}: proportion {proportion!r} is not a number") from None
            domains.append(DomainSpec(path, proportion))
        return cls(tuple(domains))

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


def _pair(item) -> tuple[str, float]:
    if isinstance(item, str):
        path, sep, proportion = item.rpartition("=")
        return (path, proportion) if sep else (item, 1.0)
    if isinstance(item, Mapping):
        return item["path"], item.get("proportion", 1.0)
    path, proportion = item
    return path, proportion
