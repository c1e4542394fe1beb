"""Click-through-rate data: the shared tensor format, and a Criteo TSV loader.

Every CTR dataset of the zoo is a :class:`CTRData`: an example is ``(idx, bag)``. ``idx [F1]``
holds one value per one-valued field, as rows of one embedding table shared by all fields
(per-field offsets already added). ``bag`` holds the multi-hot fields (MovieLens genres) densely:
field ``k`` owns ``bags[k] = (first_row, n)``, the table rows ``first_row .. first_row + n - 1``,
and ``n`` consecutive columns of ``bag``, weighted ``1/count`` when present and 0 when absent, so
its field embedding is the mean of its values' embeddings. Criteo has no multi-hot field
(``bag`` is ``[N, 0]``).

Criteo's format (Display Advertising Challenge ``train.txt``, one example a line, tab-separated):
``label, I1..I13 (integers, may be empty), C1..C26 (hashed hex strings, may be empty)``. Integers
are log-bucketed (``v > 2 -> floor(ln(v)^2)``, the competition winners' transform) and then treated
as categories; every categorical value seen fewer than ``min_count`` times in the training part
maps to its field's "rare/missing" index 0. Split: random 80/10/10 with a fixed seed.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from . import DataFormatError, DataNotFoundError

N_INT, N_CAT = 13, 26
COLUMNS = ["label"] + [f"I{i}" for i in range(1, N_INT + 1)] + [f"C{i}" for i in range(1, N_CAT + 1)]


@dataclasses.dataclass
class CTRData:
    field_names: list[str]  # one-valued fields first, then multi-hot ones
    vocab_size: int  # rows of the shared embedding table
    bags: list[tuple[int, int]]  # per multi-hot field: (first table row, values)
    # "train" | "val" | "test" -> (idx [N, F1] long, bag [N, sum of n] float, label [N] float)
    splits: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def num_fields(self) -> int:
        return len(self.field_names)

    def to(self, device) -> CTRData:
        splits = {k: tuple(t.to(device) for t in v) for k, v in self.splits.items()}
        return dataclasses.replace(self, splits=splits)

    def subset(self, n: int) -> CTRData:
        """The first ``n`` examples of every split (for tests and smoke runs)."""
        splits = {k: tuple(t[:n] for t in v) for k, v in self.splits.items()}
        return dataclasses.replace(self, splits=splits)


def split_indices(n: int, fractions=(0.8, 0.1, 0.1), seed: int = 0) -> dict[str, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    a, b = int(fractions[0] * n), int((fractions[0] + fractions[1]) * n)
    return {"train": perm[:a], "val": perm[a:b], "test": perm[b:]}


def _int_bucket(v: float) -> str:
    if v != v:  # NaN: missing
        return ""
    v = int(v)
    return str(int(math.log(v) ** 2) + 3) if v > 2 else str(v)  # +3 keeps buckets apart from 0..2


def _check_criteo_lines(path: Path) -> None:
    """The first and last lines hold the 40 columns (39 tabs): catches other formats and files cut
    short, without reading the whole (possibly 11 GB) file."""
    size = path.stat().st_size
    if size == 0:
        raise DataFormatError(f"{path} is empty; expected Criteo TSV rows (label, I1..I13, C1..C26)")
    with open(path, "rb") as f:
        first = f.readline()
        f.seek(max(0, size - (1 << 16)))
        last = f.read().rstrip(b"\r\n").rsplit(b"\n", 1)[-1]
    for where, line in (("first", first.rstrip(b"\r\n")), ("last", last)):
        columns = len(line.split(b"\t"))
        if columns != len(COLUMNS):
            raise DataFormatError(
                f"{path}: the {where} line has {columns} tab-separated columns; "
                f"expected {len(COLUMNS)} (label, I1..I13, C1..C26): another format, or a "
                "file cut short"
            )


def load_criteo(path: str | Path, min_count: int = 10, max_rows: int | None = None, seed: int = 0) -> CTRData:
    """Read a Criteo TSV file (``label, 13 integer, 26 categorical`` columns, no header)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"Criteo TSV file not found: {path}")
    _check_criteo_lines(path)
    try:
        df = pd.read_csv(
            path, sep="\t", header=None, names=COLUMNS, nrows=max_rows, dtype={c: str for c in COLUMNS[1 + N_INT :]}
        )
    except (UnicodeDecodeError, pd.errors.ParserError) as err:
        raise DataFormatError(f"{path} is not a Criteo TSV file ({err})") from None
    labels = pd.to_numeric(df["label"], errors="coerce")
    if df.shape[1] != len(COLUMNS) or not labels.isin([0, 1]).all():
        raise DataFormatError(f"{path}: expected {len(COLUMNS)} tab-separated columns with a 0/1 label first")
    parts = split_indices(len(df), seed=seed)
    is_train = np.zeros(len(df), dtype=bool)
    is_train[parts["train"]] = True

    fields, offset = COLUMNS[1:], 0
    idx = np.zeros((len(df), len(fields)), dtype=np.int64)
    for f, name in enumerate(fields):
        col = df[name].map(_int_bucket) if name.startswith("I") else df[name].fillna("")
        counts = col[is_train].value_counts()
        keep = counts[(counts >= min_count) & (counts.index != "")].index
        vocab = {v: i + 1 for i, v in enumerate(sorted(keep))}  # 0: rare or missing
        idx[:, f] = col.map(vocab).fillna(0).to_numpy(np.int64) + offset
        offset += len(vocab) + 1

    idx_t = torch.from_numpy(idx)
    bag_t = torch.zeros(len(df), 0)
    label = torch.tensor(df["label"].to_numpy(np.float32))
    splits = {k: (idx_t[v], bag_t[v], label[v]) for k, v in ((k, torch.from_numpy(v)) for k, v in parts.items())}
    info = {"source": str(path), "rows": len(df), "min_count": min_count, "positives": float(label.mean())}
    return CTRData(field_names=fields, vocab_size=offset, bags=[], splits=splits, info=info)
