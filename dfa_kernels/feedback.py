"""The feedback spec: everything that defines the fixed random matrix B, and nothing of B itself.

B is a pure function of (seed, i, j) (see ``csrc/include/dfa_kernels/hash.h``), so a spec is a few
integers: it is what a checkpoint stores, and every rank of a distributed job rebuilds the same B.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch

DISTRIBUTIONS = ("uniform", "gaussian", "rademacher", "sparse")
LAYOUTS = ("independent", "shared")
SEED_LIMIT = 2**32
INDEX_LIMIT = 2**32  # the hash indexes B's rows and columns with 32-bit integers


# FeedbackSpec.matrix() builds B with the ops, which import this module: the spec is below them, so
# the package hands the builder over at import (dfa_kernels/__init__.py, before any spec exists).
_matrix_builder: Callable[..., torch.Tensor] | None = None


def set_matrix_builder(build: Callable[..., torch.Tensor]) -> None:
    """`build(spec, dtype=, device=, backend=)` -> B: what :meth:`FeedbackSpec.matrix` calls."""
    global _matrix_builder
    _matrix_builder = build


def _is_int(value: object) -> bool:
    """An integer (numpy's too), not a bool (True is no width or seed) nor a float (2.5 is no width)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_choice(name: str, value: object, choices: Collection[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class FeedbackSpec:
    """B: [out_features, total_width], one column slice (or prefix, in the shared layout) per point.

    ``layout="independent"``: D = sum(widths), point l reads columns offsets[l] : offsets[l] + d_l.
    ``layout="shared"`` (TinyDFA's): D = max(widths), every point reads the first d_l columns.
    ``distribution="sparse"``: entries are +-1 with probability ``density``, else 0.
    """

    out_features: int
    widths: Sequence[int]  # any sequence of ints; stored as a tuple
    seed: int = 0
    distribution: str = "uniform"
    layout: str = "independent"
    density: float = 0.1

    def __post_init__(self) -> None:
        widths = self.widths
        if isinstance(widths, (str, bytes)) or not hasattr(widths, "__iter__") or not all(_is_int(w) for w in widths):
            raise ValueError(f"widths must be a non-empty list of positive ints; got {widths!r}")
        object.__setattr__(self, "widths", tuple(int(w) for w in widths))
        if not _is_int(self.out_features) or self.out_features < 1:
            raise ValueError(f"out_features must be a positive int; got {self.out_features!r}")
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(f"widths must be a non-empty list of positive ints; got {list(self.widths)}")
        if self.out_features > INDEX_LIMIT or self.total_width > INDEX_LIMIT:
            raise ValueError(
                f"out_features ({self.out_features}) and the total width ({self.total_width}) must be "
                f"at most 2**32: the hash indexes B's rows and columns with 32-bit integers"
            )
        if not _is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed must be an int in [0, 2**32); got {self.seed!r}")
        _check_choice("distribution", self.distribution, DISTRIBUTIONS)
        _check_choice("layout", self.layout, LAYOUTS)
        if not isinstance(self.density, numbers.Real) or not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1]; got {self.density!r}")

    @property
    def total_width(self) -> int:
        return sum(self.widths) if self.layout == "independent" else max(self.widths)

    @property
    def offsets(self) -> tuple[int, ...]:
        if self.layout == "shared":
            return (0,) * len(self.widths)
        return tuple(sum(self.widths[:l]) for l in range(len(self.widths)))

    def matrix(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", backend: str = "auto"
    ) -> torch.Tensor:
        """B [out_features, total_width], unscaled (built by ``dfa_kernels.ops.feedback_matrix``)."""
        if _matrix_builder is None:  # only before dfa_kernels/__init__.py has run
            raise RuntimeError("FeedbackSpec.matrix() needs the package's matrix builder: import dfa_kernels first")
        return _matrix_builder(self, dtype=dtype, device=device, backend=backend)

    def point_matrix(
        self, index: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """B_l [out_features, widths[index]], unscaled."""
        off, width = self.offsets[index], self.widths[index]
        return self.matrix(dtype, device)[:, off : off + width]

    def scales(self, scale: float | str = "auto") -> list[float]:
        """Per-point multipliers: 'auto' is 1/sqrt(d_l) (independent) or 1/sqrt(max d) (shared, TinyDFA)."""
        if scale == "auto":
            if self.layout == "shared":
                return [1.0 / math.sqrt(self.total_width)] * len(self.widths)
            return [1.0 / math.sqrt(w) for w in self.widths]
        if isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale):
            return [float(scale)] * len(self.widths)
        raise ValueError(f"scale must be 'auto' or a finite number; got {scale!r}")

    def state(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> FeedbackSpec:
        """The spec of ``spec.state()``; a ValueError names what a corrupt or foreign state lacks."""
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(state, dict) or not {"out_features", "widths"} <= state.keys() or state.keys() - fields:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"a FeedbackSpec state must be a dict with keys {sorted(fields)} (from spec.state()); got {got}"
            )
        return cls(**state)
