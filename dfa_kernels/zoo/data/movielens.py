"""MovieLens-100k as a click-through-rate task, read from the installed ``recbole`` package.

The files ship inside recbole's wheel (``dataset_example/ml-100k``); we read them straight from
the package folder, without importing recbole. The data is under GroupLens terms: never commit
or redistribute it. Install (data only, no dependencies): ``pip install --no-deps -r requirements/data.txt``.

CTR framing: label = rating >= 4 (55.4% positives). Fields: user, item, age (7 buckets), gender,
occupation, zip (first 2 characters), release_year (buckets), genres (multi-hot, 19 genres,
weighted 1/count). Split: temporal 80/10/10 train/val/test, by timestamp (ties by file order):
- ``split="user"`` (default): each user's own ratings in time order (first 80% train, next 10%
  val, last 10% test). Every test user has history in train: the models' user features matter.
- ``split="global"``: all ratings in time order. ML-100k's users arrive over time, so 86% of the
  test interactions belong to users never seen in training (cold start: AUC ~0.70 for any model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import INSTALL_HINT, DataNotFoundError, package_dir
from .criteo import CTRData

FIELDS = ["user", "item", "age", "gender", "occupation", "zip", "release_year", "genres"]
AGE_EDGES = [18, 25, 35, 45, 50, 56]
YEAR_EDGES = [1940, 1950, 1960, 1970, 1980, 1990, 1993, 1995, 1996, 1997, 1998]


def ml100k_dir() -> Path:
    package = package_dir("recbole")
    if package is None:
        raise DataNotFoundError(
            "MovieLens-100k comes with the recbole package, which is not "
            f"installed; install it (data only) with: {INSTALL_HINT}"
        )
    path = package / "dataset_example" / "ml-100k"
    if not (path / "ml-100k.inter").is_file():
        raise DataNotFoundError(f"{path}/ml-100k.inter is missing; reinstall with: {INSTALL_HINT}")
    return path


def _read(path: Path):
    import pandas as pd

    df = pd.read_csv(path, sep="\t", dtype=str)
    df.columns = [c.split(":")[0] for c in df.columns]  # "user_id:token" -> "user_id"
    return df


def _codes(values) -> np.ndarray:
    """Dense ids 0..n-1 for the distinct values (sorted, so ids are stable)."""
    return np.unique(np.asarray(values), return_inverse=True)[1].astype(np.int64)


def load_movielens(split: str = "user", fractions=(0.8, 0.1, 0.1)) -> CTRData:
    d = ml100k_dir()
    inter, users, items = _read(d / "ml-100k.inter"), _read(d / "ml-100k.user"), _read(d / "ml-100k.item")

    # One-valued fields, per user / per item, as dense ids (user/item ids come from the side files).
    year = items["release_year"].apply(lambda s: float(s) if s.isdigit() else np.nan).to_numpy()
    user_cols = {
        "user": _codes(users["user_id"]),
        "age": np.digitize(users["age"].astype(int), AGE_EDGES),
        "gender": _codes(users["gender"]),
        "occupation": _codes(users["occupation"]),
        "zip": _codes(users["zip_code"].str[:2]),
    }
    item_cols = {
        "item": _codes(items["item_id"]),
        "release_year": np.where(np.isnan(year), len(YEAR_EDGES) + 1, np.digitize(year, YEAR_EDGES)),
    }
    genre_names = sorted({g for s in items["class"].fillna("") for g in s.split()})
    genres = np.zeros((len(items), len(genre_names)), dtype=np.float32)
    for r, s in enumerate(items["class"].fillna("")):
        for g in s.split():
            genres[r, genre_names.index(g)] = 1.0
    genres /= np.maximum(genres.sum(1, keepdims=True), 1.0)

    # Interactions, in time order.
    inter = inter.assign(ts=inter["timestamp"].astype(float)).sort_values("ts", kind="stable")
    u_row = users.reset_index().set_index("user_id")["index"].loc[inter["user_id"]].to_numpy()
    i_row = items.reset_index().set_index("item_id")["index"].loc[inter["item_id"]].to_numpy()
    label = (inter["rating"].astype(float) >= 4).to_numpy(np.float32)

    cols, offset, sizes = [], 0, {}
    for name in FIELDS[:-1]:
        ids = user_cols[name][u_row] if name in user_cols else item_cols[name][i_row]
        size = int((user_cols.get(name) if name in user_cols else item_cols[name]).max()) + 1
        cols.append(ids + offset)
        offset, sizes[name] = offset + size, size
    n, G = len(inter), len(genre_names)
    sizes["genres"], bags = G, [(offset, G)]
    idx_t, label_t = torch.from_numpy(np.stack(cols, 1)), torch.from_numpy(label)
    bag_t = torch.from_numpy(genres[i_row])
    if split == "global":  # the last 20% of all ratings in time: mostly users unseen in train
        pos = np.arange(n) / n
    elif split == "user":  # each user's own ratings in time order: warm users
        g = inter.groupby("user_id", sort=False)
        pos = (g.cumcount() / g["ts"].transform("size")).to_numpy()
    else:
        raise ValueError(f"split must be 'global' or 'user', not {split!r}")
    a, b = fractions[0], fractions[0] + fractions[1]
    parts = {
        "train": torch.from_numpy(pos < a),
        "val": torch.from_numpy((pos >= a) & (pos < b)),
        "test": torch.from_numpy(pos >= b),
    }
    splits = {k: (idx_t[s], bag_t[s], label_t[s]) for k, s in parts.items()}
    return CTRData(
        field_names=list(FIELDS),
        vocab_size=offset + G,
        bags=bags,
        splits=splits,
        info={
            "source": str(d),
            "interactions": n,
            "users": len(users),
            "items": len(items),
            "positives": float(label.mean()),
            "field_sizes": sizes,
            "split": f"temporal ({split}) " + "/".join(str(round(100 * f)) for f in fractions),
        },
    )
