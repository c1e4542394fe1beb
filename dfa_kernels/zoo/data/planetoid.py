"""Planetoid citation graphs (Cora, CiteSeer, PubMed) from the original ``ind.NAME.*`` files.

The Planetoid release (Yang, Cohen & Salakhutdinov, ICML 2016) carries the *public* split used by
GCN, GAT and the DFA-at-scale paper's graph table. Cora and CiteSeer ship with the package
(``planetoid_files/``, :func:`load_packaged`); nothing is downloaded. For others (PubMed), point
the loader (or ``dfa-kernels train gcn-cora --data DIR:NAME``) at a folder holding

    ind.NAME.x  ind.NAME.tx  ind.NAME.allx     pickled scipy CSR feature matrices
    ind.NAME.y  ind.NAME.ty  ind.NAME.ally     pickled numpy one-hot label arrays
    ind.NAME.graph                             pickled dict: node -> list of neighbours
    ind.NAME.test.index                        one test node id per line

Assembly follows PyG's ``read_planetoid_data``: training nodes are the first ``len(y)`` rows, the
500 validation nodes the next ones, test nodes those listed in ``test.index`` (reordered into
place). Where test ids are not contiguous (CiteSeer: 15 isolated nodes have no test row), the
missing rows are padded with zero features and label 0 and belong to no split (``padded_mask``).
Edges are symmetric as stored, with self-loops and duplicates removed.

:func:`stratified_split` replaces the public split by the random stratified 20 / 20 / 60 split of
the DFA paper's DNA experiment (``--data cora-stratified``).

Pickles can run code, so they are read with a restricted unpickler that admits only the few
numpy/builtin classes these files use (plus ``codecs.encode``, with which Python 3 writes bytes at
pickle protocol 2); the CSR matrices are rebuilt from their stored arrays
without importing scipy.
"""

from __future__ import annotations

import collections
import pickle
from pathlib import Path

import numpy as np
import torch

from . import DataFormatError, DataNotFoundError

FILES = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")
# Cora and CiteSeer ship with the package (MIT-licensed Planetoid files, 1.6 MB; see the README there).
PACKAGED_DIR = Path(__file__).parent / "planetoid_files"
PACKAGED = ("cora", "citeseer")


class _CSRState:
    """Receives a pickled ``scipy.sparse.csr_matrix``'s state (data, indices, indptr, shape)."""

    def __setstate__(self, state):
        self.state = state

    def dense(self) -> np.ndarray:
        s = self.state
        rows, cols = s["_shape"]
        out = np.zeros((rows, cols), dtype=np.float32)
        counts = np.diff(s["indptr"])
        out[np.repeat(np.arange(rows), counts), s["indices"]] = s["data"]
        return out


def _np_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if name in ("csr_matrix", "csr_array") and module.startswith("scipy.sparse"):
            return _CSRState
        if (module, name) == ("_codecs", "encode"):  # how Python 3 writes bytes at protocol 2
            return __import__("codecs").encode
        if (module, name) in {("numpy", "ndarray"), ("numpy", "dtype")}:
            return getattr(np, name)
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _np_reconstruct()
        if (module, name) == ("collections", "defaultdict"):
            return collections.defaultdict
        if module in ("__builtin__", "builtins") and name in ("list", "dict", "set", "int"):
            return getattr(__import__("builtins"), name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a Planetoid file")


class PlanetoidFileError(DataFormatError, pickle.UnpicklingError):
    """A Planetoid file that is not the pickle (or index) it should be: corrupt, truncated, foreign."""


def _read(folder: Path, name: str, part: str):
    path = folder / f"ind.{name}.{part}"
    if not path.exists():
        raise DataNotFoundError(f"Planetoid file {path} is missing (need ind.{name}.{{" + ",".join(FILES) + "})")
    if part == "test.index":
        words = path.read_bytes().split()
        if not words or not all(w.isdigit() for w in words):
            raise PlanetoidFileError(f"{path}: expected one non-negative node id per line")
        return torch.tensor([int(w) for w in words], dtype=torch.long)
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="latin1").load()
        if part == "graph":
            if not isinstance(obj, dict):
                raise TypeError(f"a {type(obj).__name__}, not a dict of neighbour lists")
            return obj
        arr = obj.dense() if isinstance(obj, _CSRState) else np.asarray(obj, dtype=np.float32)
        if arr.ndim != 2:
            raise TypeError(f"a {arr.ndim}-D array, not a matrix")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, AttributeError, IndexError) as err:
        raise PlanetoidFileError(f"{path} is not a Planetoid ind.NAME.{part} file ({err})") from None
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def parse_spec(spec: str) -> tuple[Path, str]:
    """``"DIR:NAME"``, ``"DIR/ind.NAME"`` or a ``DIR`` holding exactly one dataset -> (DIR, NAME)."""
    path, _, name = spec.rpartition(":")
    if path and name and "/" not in name and "\\" not in name:
        return Path(path).expanduser(), name.lower()
    p = Path(spec).expanduser()
    if p.name.startswith("ind.") and not p.is_dir():
        return p.parent, p.name[len("ind.") :].lower()
    if p.is_dir():
        names = sorted({f.name.split(".")[1] for f in p.glob("ind.*.test.index")})
        if len(names) == 1:
            return p, names[0]
        raise DataFormatError(
            f"{p} holds Planetoid datasets {names or 'none'}; name one as '{p}:NAME' (e.g. '{p}:citeseer')"
        )
    raise DataNotFoundError(
        f"no Planetoid data at {spec!r}; expected 'DIR:NAME' with DIR/ind.NAME.{{x,tx,allx,y,ty,ally,graph,test.index}}"
    )


def load_packaged(name: str):
    """Cora or CiteSeer with the public split, from the files shipped in the package."""
    if name not in PACKAGED:
        raise ValueError(
            f"the package ships the Planetoid datasets {PACKAGED}; got {name!r} "
            "(read other Planetoid files with --data DIR:NAME)"
        )
    return load_planetoid(PACKAGED_DIR, name)


def load_planetoid(folder: str | Path, name: str):
    """One Planetoid dataset as a ``torch_geometric.data.Data`` with the public split masks."""
    from torch_geometric.data import Data
    from torch_geometric.utils import coalesce, index_to_mask, remove_self_loops

    folder, name = Path(folder).expanduser(), name.lower()
    x, tx, allx, y, ty, ally, graph, test_index = (_read(folder, name, p) for p in FILES)
    sorted_test = test_index.sort().values
    lo, hi = int(test_index.min()), int(test_index.max())
    if hi - lo + 1 > tx.size(0):  # non-contiguous test ids (CiteSeer): pad the missing rows
        tx_ext = tx.new_zeros(hi - lo + 1, tx.size(1))
        ty_ext = ty.new_zeros(hi - lo + 1, ty.size(1))
        tx_ext[sorted_test - lo], ty_ext[sorted_test - lo] = tx, ty
        tx, ty = tx_ext, ty_ext

    x = torch.cat([allx, tx])
    x[test_index] = x[sorted_test]
    labels = torch.cat([ally, ty]).argmax(dim=1)
    labels[test_index] = labels[sorted_test]
    n = labels.numel()

    rows = [int(k) for k, nbrs in graph.items() for _ in nbrs]
    cols = [int(v) for nbrs in graph.values() for v in nbrs]
    edge_index, _ = remove_self_loops(torch.tensor([rows, cols], dtype=torch.long))
    edge_index = coalesce(edge_index, num_nodes=n)

    data = Data(x=x, edge_index=edge_index, y=labels)
    data.padded_mask = torch.zeros(n, dtype=torch.bool)  # rows with no node behind them
    data.padded_mask[allx.size(0) :] = True
    data.padded_mask[test_index] = False
    data.train_mask = index_to_mask(torch.arange(y.size(0)), size=n)
    data.val_mask = index_to_mask(torch.arange(y.size(0), min(y.size(0) + 500, n)), size=n)
    data.test_mask = index_to_mask(test_index, size=n)
    data.name = name
    return data


def stratified_split(data, seed: int, folds: int = 5):
    """A copy of `data` with the random stratified split of the DFA paper's DNA experiment.

    Launay et al.'s ``geometric.py`` splits Cora for DNA with scikit-learn's
    ``StratifiedKFold(5, shuffle=True, random_state=seed)`` (the run's seed) over every node: the
    first fold trains, the second validates, the other three test, 20 / 20 / 60 % of the nodes
    (Cora: 542 / 542 / 1624). Done the same way here, over the nodes in the same (PyG) order, so a
    seed gives the paper's split for that seed; padded rows (CiteSeer's missing test ids) take no
    part. ``folds`` other than 5 keeps the layout: one fold each for training and validation.
    """
    from sklearn.model_selection import StratifiedKFold

    if folds < 3:
        raise ValueError(f"a stratified split needs at least 3 folds (train, val, test); got {folds}")
    nodes = torch.arange(data.num_nodes)
    padded = getattr(data, "padded_mask", None)
    if padded is not None:
        nodes = nodes[~padded]
    labels = data.y[nodes].numpy()
    parts = [
        nodes[torch.from_numpy(i)]
        for _, i in StratifiedKFold(folds, shuffle=True, random_state=seed).split(labels, labels)
    ]
    out = data.clone()
    n = data.num_nodes
    out.train_mask = torch.zeros(n, dtype=torch.bool).index_fill_(0, parts[0], True)
    out.val_mask = torch.zeros(n, dtype=torch.bool).index_fill_(0, parts[1], True)
    out.test_mask = torch.zeros(n, dtype=torch.bool).index_fill_(0, torch.cat(parts[2:]), True)
    return out
