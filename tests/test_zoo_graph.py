"""Graph zoo: models in every mode, the pure-PyTorch SplineConv, the Cora and Planetoid loaders,
and the registered tasks."""

import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dfa_kernels as dk

pytest.importorskip("torch_geometric")

from dfa_kernels.zoo.data import planetoid as P  # noqa: E402
from dfa_kernels.zoo.models import graph as G  # noqa: E402

PLANETOID_DIR = Path(os.environ.get("DFA_PLANETOID_DIR", Path(__file__).resolve().parents[2] / "shared" / "planetoid"))
needs_planetoid = pytest.mark.skipif(
    not (PLANETOID_DIR / "ind.cora.x").exists(),
    reason=f"real Planetoid files not found at {PLANETOID_DIR} (set DFA_PLANETOID_DIR)",
)


def _has_graphdatascience():
    import importlib.util

    return importlib.util.find_spec("graphdatascience") is not None


needs_cora = pytest.mark.skipif(
    not _has_graphdatascience(), reason="graphdatascience not installed: pip install --no-deps -r requirements/data.txt"
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------------------------ models
def synthetic_graph(n=60, classes=3, features=12, seed=0):
    """Class-correlated features, mostly intra-class edges, a pseudo-coordinate per edge."""
    from torch_geometric.data import Data
    from torch_geometric.utils import coalesce, to_undirected

    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = (torch.rand(n, features, generator=g) < 0.2).float()
    x[torch.arange(n), y] = 1.0
    src = torch.randint(0, n, (4 * n,), generator=g)
    dst = torch.where(
        torch.rand(4 * n, generator=g) < 0.8, (src + classes) % n, torch.randint(0, n, (4 * n,), generator=g)
    )
    edge_index = coalesce(to_undirected(torch.stack([src, dst])), num_nodes=n)
    edge_index = edge_index[:, edge_index[0] != edge_index[1]]
    data = Data(x=x, edge_index=edge_index, y=y, edge_attr=torch.rand(edge_index.size(1), 1, generator=g))
    data.train_mask = torch.arange(n) < n // 2
    return data


# name -> (constructor, uses edge_attr, output-layer prefix)
NODE_MODELS = {
    "gcn": (lambda i, o, dfa: G.GCN(i, o, hidden=16, dfa=dfa), False, "conv2."),
    "gat": (lambda i, o, dfa: G.GAT(i, o, hidden=4, heads=2, dfa=dfa), False, "conv2."),
    "cheb": (lambda i, o, dfa: G.Cheb(i, o, hidden=16, K=2, dfa=dfa), False, "conv2."),
    "spline": (lambda i, o, dfa: G.Spline(i, o, hidden=16, dfa=dfa), True, "conv2."),
    "dna": (lambda i, o, dfa: G.DNA(i, o, hidden=16, num_layers=3, heads=2, groups=2, dfa=dfa), False, "lin2."),
}


@pytest.mark.parametrize("mode", ["bp", "dfa", "shallow"])
@pytest.mark.parametrize("name", list(NODE_MODELS))
def test_node_model_modes(name, mode):
    build, with_attr, out_prefix = NODE_MODELS[name]
    data = synthetic_graph()
    torch.manual_seed(0)
    model = build(data.num_features, 3, dk.DFA(mode=mode, seed=0))
    args = (data.x, data.edge_index, data.edge_attr if with_attr else None)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for step in range(40):
        model.train()
        opt.zero_grad(set_to_none=True)
        out = model(*args)
        assert out.shape == (data.num_nodes, 3)
        loss = F.nll_loss(out[data.train_mask], data.y[data.train_mask])
        loss.backward()
        if step == 0:
            for n, p in model.named_parameters():
                learns = mode != "shallow" or n.startswith(out_prefix)
                assert (p.grad is not None) == learns, f"{name}/{mode}: {n} grad is {p.grad is not None}"
                if learns:
                    assert torch.isfinite(p.grad).all()
        opt.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < losses[0] - 0.01, f"{name}/{mode}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_gcn_dfa_feedback_is_e_times_B():
    """In DFA mode conv1 learns from e @ B through its own ReLU (eval mode: no dropout)."""
    data = synthetic_graph()
    dfa = dk.DFA(mode="dfa", seed=3)
    model = G.GCN(data.num_features, 3, hidden=16, dfa=dfa).eval()
    seen = {}
    model.conv1.register_forward_hook(lambda m, i, o: seen.setdefault("a", o))
    model.conv2.register_forward_hook(lambda m, i, o: seen.setdefault("y", o))
    out = model(data.x, data.edge_index)
    loss = F.nll_loss(out[data.train_mask], data.y[data.train_mask])
    (e,) = torch.autograd.grad(loss, seen["y"], retain_graph=True)
    loss.backward()
    (B,) = dfa.feedback_matrices()
    expected = ((e @ B) * (seen["a"] > 0)).sum(0)  # GCNConv adds its bias after propagation
    torch.testing.assert_close(model.conv1.bias.grad, expected, rtol=1e-4, atol=1e-6)
    assert e[~data.train_mask].abs().max() == 0  # no error, hence no feedback, off the mask


@pytest.mark.parametrize("mode", ["bp", "dfa", "shallow"])
def test_graph_autoencoder_modes(mode):
    data = synthetic_graph()
    torch.manual_seed(0)
    model = G.graph_autoencoder(data.num_features, out_channels=8, dfa=dk.DFA(mode=mode))
    from torch_geometric.utils import negative_sampling

    neg = negative_sampling(data.edge_index, data.num_nodes)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for step in range(40):
        opt.zero_grad(set_to_none=True)
        z = model.encode(data.x, data.edge_index)
        assert z.shape == (data.num_nodes, 8)
        loss = model.recon_loss(z, data.edge_index, neg)
        loss.backward()
        if step == 0:
            for n, p in model.named_parameters():
                assert (p.grad is not None) == (mode != "shallow" or n.startswith("encoder.conv2.")), n
        opt.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0]
    auc, ap = model.test(z.detach(), data.edge_index, neg)
    assert 0.0 <= auc <= 1.0 and 0.0 <= ap <= 1.0


def test_feature_dropout_is_dropout_on_the_nonzeros():
    x = (torch.rand(200, 50) < 0.1).float() * 3.0
    out = G.feature_dropout(x, 0.6, training=True)
    assert torch.equal(out[x == 0], torch.zeros_like(out[x == 0]))
    kept = out[x != 0]
    assert set(kept.unique().tolist()) <= {0.0, 3.0 / 0.4}
    assert abs((kept != 0).float().mean().item() - 0.4) < 0.05
    assert G.feature_dropout(x, 0.6, training=False) is x


# ------------------------------------------------------------------------------------ SplineConv
def test_spline_basis_hand_computed():
    # dim 2, kernel (3, 4), open: v = u * (k - 1) = (0.25 * 2, 0.8 * 3) = (0.5, 2.4)
    # cell (0, 2), fractions (0.5, 0.4); index = i0 + 3 * i1 for corners (0,2) (1,2) (0,3) (1,3)
    basis, index = G.spline_basis(torch.tensor([[0.25, 0.8]]), torch.tensor([3, 4]), torch.tensor([1, 1]))
    torch.testing.assert_close(basis, torch.tensor([[0.5 * 0.6, 0.5 * 0.6, 0.5 * 0.4, 0.5 * 0.4]]))
    assert index.tolist() == [[6, 7, 9, 10]]
    # dim 1, kernel 2 (the Cora setting): u -> weights (1 - u, u) on kernels (0, 1); u = 1 stays in range
    basis, index = G.spline_basis(torch.tensor([0.0, 0.3, 1.0]), torch.tensor([2]), torch.tensor([1]))
    torch.testing.assert_close(basis, torch.tensor([[1.0, 0.0], [0.7, 0.3], [1.0, 0.0]]))
    assert index.tolist() == [[0, 1], [0, 1], [1, 0]]
    # closed spline wraps around: kernel 4, v = 0.9 * 4 = 3.6 -> knots 3 and 0
    basis, index = G.spline_basis(torch.tensor([0.9]), torch.tensor([4]), torch.tensor([0]))
    torch.testing.assert_close(basis, torch.tensor([[0.4, 0.6]]))
    assert index.tolist() == [[3, 0]]


def test_spline_conv_hand_computed():
    """Node 0 averages two messages; x_j @ ((1 - u) W0 + u W1), plus the root weight and bias."""
    conv = G.SplineConv(1, 1, dim=1, kernel_size=2)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[2.0]], [[10.0]]]))
        conv.lin.weight.fill_(0.5)
        conv.bias.fill_(1.0)
    x = torch.tensor([[1.0], [3.0], [5.0]])
    edge_index = torch.tensor([[1, 2], [0, 0]])  # 1 -> 0 and 2 -> 0
    u = torch.tensor([[0.25], [1.0]])
    out = conv(x, edge_index, u)
    m1 = 3.0 * (0.75 * 2.0 + 0.25 * 10.0)  # 12
    m2 = 5.0 * 10.0  # u = 1 on an open spline: the last knot
    expected = torch.tensor([[(m1 + m2) / 2 + 0.5 * 1.0 + 1.0], [0.5 * 3.0 + 1.0], [0.5 * 5.0 + 1.0]])
    torch.testing.assert_close(out, expected)


def test_spline_conv_matches_per_edge_loop_on_cartesian_coordinates():
    """2-D pseudo-coordinates from PyG's Cartesian transform, kernel 3 x 4, against a plain loop."""
    import torch_geometric.transforms as T
    from torch_geometric.data import Data

    g = torch.Generator().manual_seed(1)
    data = T.Cartesian()(
        Data(
            pos=torch.rand(6, 2, generator=g),
            edge_index=torch.tensor([[0, 1, 2, 3, 4, 5, 0, 2], [1, 2, 3, 4, 5, 0, 3, 3]]),
        )
    )
    x = torch.randn(6, 5, generator=g)
    conv = G.SplineConv(5, 3, dim=2, kernel_size=[3, 4])
    out = conv(x, data.edge_index, data.edge_attr)

    def hat(u, k):  # open linear B-spline weights over the k knots
        v = u * (k - 1)
        lo = min(int(v), k - 1)
        w = torch.zeros(k)
        w[lo] += 1 - (v - lo)
        w[(lo + 1) % k] += v - lo
        return w

    ref, count = torch.zeros(6, 3), torch.zeros(6)
    for (j, i), (u0, u1) in zip(data.edge_index.t().tolist(), data.edge_attr.tolist()):
        w0, w1 = hat(u0, 3), hat(u1, 4)
        kernel = sum(w0[a] * w1[b] * conv.weight[a + 3 * b] for a in range(3) for b in range(4))
        ref[i] += x[j] @ kernel
        count[i] += 1
    ref = ref / count.clamp(min=1)[:, None] + conv.lin(x) + conv.bias
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ Planetoid
def _write_planetoid(folder: Path, name: str, missing_test_id: bool):
    """A tiny Planetoid dataset: 3 training nodes, allx rows 0..7, test ids among 8..11."""
    sp = pytest.importorskip("scipy.sparse")
    import numpy as np

    rng = np.random.default_rng(0)
    n_feat, n_cls = 5, 3
    n_train, n_all = 3, 8  # allx: nodes 0..7 (train 0..2), test nodes 8..11
    test_ids = [11, 8, 10] if missing_test_id else [11, 8, 10, 9]

    def onehot(k):
        return np.eye(n_cls)[rng.integers(0, n_cls, k)]

    x_all = (rng.random((n_all, n_feat)) < 0.5).astype(np.float32)
    tx = (rng.random((len(test_ids), n_feat)) < 0.5).astype(np.float32) + 2.0
    objs = {
        "x": sp.csr_matrix(x_all[:n_train]),
        "allx": sp.csr_matrix(x_all),
        "tx": sp.csr_matrix(tx),
        "y": onehot(n_train),
        "ally": onehot(n_all),
        "ty": onehot(len(test_ids)),
        "graph": {0: [1, 2], 1: [0], 2: [0, 2], 3: [4], 4: [3, 11], 8: [10], 10: [8], 11: [4]},
    }
    for key, obj in objs.items():
        with open(folder / f"ind.{name}.{key}", "wb") as f:
            pickle.dump(obj, f, protocol=2)
    (folder / f"ind.{name}.test.index").write_text("\n".join(map(str, test_ids)) + "\n")
    return objs, test_ids


@pytest.mark.parametrize("missing", [False, True])
def test_planetoid_generated_files(tmp_path, missing):
    objs, test_ids = _write_planetoid(tmp_path, "tiny", missing)
    data = P.load_planetoid(tmp_path, "tiny")
    n = 12
    assert data.num_nodes == n and data.x.shape == (n, 5)
    assert data.train_mask.nonzero().flatten().tolist() == [0, 1, 2]
    assert data.val_mask.nonzero().flatten().tolist() == list(range(3, n))  # 500 clipped to the graph
    assert sorted(data.test_mask.nonzero().flatten().tolist()) == sorted(test_ids)
    tx, ty = objs["tx"].toarray(), objs["ty"].argmax(1)
    for row, node in enumerate(test_ids):  # the k-th tx row is the k-th listed test id
        assert data.x[node].tolist() == tx[row].tolist()
        assert data.y[node].item() == ty[row]
    torch.testing.assert_close(data.x[:8], torch.tensor(objs["allx"].toarray()))
    if missing:  # isolated test id 9: a zero row, label 0, not a test node
        assert data.x[9].abs().sum() == 0 and data.y[9] == 0 and not data.test_mask[9]
    edges = set(map(tuple, data.edge_index.t().tolist()))
    assert (0, 1) in edges and (4, 11) in edges and (2, 2) not in edges  # self-loop removed
    assert P.parse_spec(f"{tmp_path}:TINY") == (tmp_path, "tiny")
    assert P.parse_spec(str(tmp_path / "ind.tiny")) == (tmp_path, "tiny")
    assert P.parse_spec(str(tmp_path)) == (tmp_path, "tiny")


def test_planetoid_refuses_foreign_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    _write_planetoid(tmp_path, "evil", False)
    with open(tmp_path / "ind.evil.x", "wb") as f:
        pickle.dump(Evil(), f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        P.load_planetoid(tmp_path, "evil")
    with pytest.raises(FileNotFoundError, match="ind.nope"):
        P.load_planetoid(tmp_path, "nope")


@needs_planetoid
@pytest.mark.parametrize(
    "name, nodes, features, classes, edges, train",
    [("cora", 2708, 1433, 7, 10556, 140), ("citeseer", 3327, 3703, 6, 9104, 120)],
)
def test_planetoid_real_files(name, nodes, features, classes, edges, train):
    data = P.load_planetoid(PLANETOID_DIR, name)
    assert data.x.shape == (nodes, features) and int(data.y.max()) + 1 == classes
    assert data.edge_index.size(1) == edges and data.is_undirected() and not data.has_self_loops()
    assert [int(m.sum()) for m in (data.train_mask, data.val_mask, data.test_mask)] == [train, 500, 1000]
    assert not (data.train_mask & data.val_mask).any() and not (data.val_mask & data.test_mask).any()
    if name == "citeseer":  # 15 isolated test ids padded with zero rows, as PyG does
        padded = data.x.abs().sum(1) == 0
        assert int(padded[2312:].sum()) >= 15


# ------------------------------------------------------------------------------------ Cora
@needs_cora
def test_cora_parquet():
    from dfa_kernels.zoo.data.cora import load_cora

    a, b = load_cora(split_seed=0), load_cora(split_seed=0)
    assert a.x.shape == (2708, 1433) and a.edge_index.size(1) == 10556 and a.is_undirected()
    assert [int(m.sum()) for m in (a.train_mask, a.val_mask, a.test_mask)] == [140, 500, 1000]
    assert torch.bincount(a.y[a.train_mask]).tolist() == [20] * 7
    assert torch.equal(a.train_mask, b.train_mask) and torch.equal(a.test_mask, b.test_mask)
    assert not torch.equal(a.train_mask, load_cora(split_seed=1).train_mask)


def test_cora_missing_package_names_install_command(monkeypatch):
    import importlib.util

    from dfa_kernels.zoo.data import cora

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps -r requirements/data\.txt"):
        cora.load_cora()


# ------------------------------------------------------------------------------------ tasks
def test_graph_tasks_registered():
    from dfa_kernels.zoo import tasks

    all_tasks = tasks.all_tasks()
    for name in ("gcn", "gat", "cheb", "spline", "dna", "gae"):
        t = all_tasks[f"{name}-cora"]
        assert t.family == "graph" and t.paper["bp"] > 0
        assert t.metric == ("test_auc" if name == "gae" else "test_acc")


@pytest.mark.parametrize(
    "task, mode", [("gcn-cora", "bp"), ("gcn-cora", "dfa"), ("spline-cora", "shallow"), ("gae-cora", "dfa")]
)
def test_graph_task_runs(task, mode):
    from dfa_kernels.zoo import tasks
    from dfa_kernels.zoo.training import train

    cfg = tasks.TrainConfig(task=task, mode=mode, epochs=3, progress=False)
    result = train(tasks.get(task), cfg)
    again = train(tasks.get(task), cfg)
    metric = tasks.get(task).metric
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in result.history)
    assert 0.0 <= result.final[metric] <= 1.0
    assert result.final[metric] == again.final[metric]  # seeded: repeatable
    assert result.backend == ("-" if mode != "dfa" else dk.DFA().resolved_backend("cpu"))
    assert result.config["mode"] == mode and result.config["lr"] > 0


@needs_planetoid
def test_graph_task_on_planetoid_files():
    from dfa_kernels.zoo import tasks
    from dfa_kernels.zoo.training import train

    cfg = tasks.TrainConfig(task="gcn-cora", mode="dfa", epochs=2, progress=False, data=f"{PLANETOID_DIR}:citeseer")
    result = train(tasks.get("gcn-cora"), cfg)
    assert len(result.history) == 2 and "citeseer" in result.config["data"]


def test_packaged_planetoid_files_are_the_public_split():
    """Cora and CiteSeer ship with the package: the default gcn-cora data is Cora's public split."""
    from dfa_kernels.zoo.recipes import graph as R

    cora, citeseer = R.load_data(None), R.load_data("citeseer")
    assert [int(m.sum()) for m in (cora.train_mask, cora.val_mask, cora.test_mask)] == [140, 500, 1000]
    assert cora.x.shape == (2708, 1433) and citeseer.x.shape == (3327, 3703)
    assert [int(m.sum()) for m in (citeseer.train_mask, citeseer.val_mask, citeseer.test_mask)] == [120, 500, 1000]
    assert R.comparable(R.TrainConfig("gcn-cora")) and not R.comparable(R.TrainConfig("gcn-cora", data="citeseer"))


# ------------------------------------------------------------------------------------ DNA (issue #20)
def test_planetoid_padded_rows_are_marked(tmp_path):
    _write_planetoid(tmp_path, "tiny", missing_test_id=True)
    data = P.load_planetoid(tmp_path, "tiny")
    assert data.padded_mask.nonzero().flatten().tolist() == [9]  # the missing test id's row
    _write_planetoid(tmp_path, "full", missing_test_id=False)
    assert not P.load_planetoid(tmp_path, "full").padded_mask.any()


def test_stratified_split_is_the_papers_dna_split():
    """The paper's geometric.py: StratifiedKFold(5, shuffle=True, random_state=seed) over every Cora
    node; fold 0 trains, fold 1 validates, folds 2-4 test."""
    from sklearn.model_selection import StratifiedKFold

    cora = P.load_packaged("cora")
    for seed in (0, 1):
        split = P.stratified_split(cora, seed)
        folds = [
            sorted(i.tolist())
            for _, i in StratifiedKFold(5, shuffle=True, random_state=seed).split(cora.y.numpy(), cora.y.numpy())
        ]
        assert split.train_mask.nonzero().flatten().tolist() == folds[0]
        assert split.val_mask.nonzero().flatten().tolist() == folds[1]
        assert split.test_mask.nonzero().flatten().tolist() == sorted(sum(folds[2:], []))
        assert [int(m.sum()) for m in (split.train_mask, split.val_mask, split.test_mask)] == [542, 542, 1624]
        assert not (split.train_mask & split.val_mask).any() and not (split.val_mask & split.test_mask).any()
        share = torch.bincount(split.y[split.train_mask], minlength=7) / torch.bincount(cora.y, minlength=7)
        assert ((share - 0.2).abs() < 0.01).all()  # stratified: 20 % of every class
    assert not torch.equal(P.stratified_split(cora, 0).train_mask, P.stratified_split(cora, 1).train_mask)
    assert int(cora.train_mask.sum()) == 140  # the public split is left as it was
    citeseer = P.stratified_split(P.load_packaged("citeseer"), 0)
    used = citeseer.train_mask | citeseer.val_mask | citeseer.test_mask
    assert not (used & citeseer.padded_mask).any() and int(used.sum()) == 3327 - 15


def test_dna_task_data_split_and_comparability():
    """--data cora-stratified draws the run seed's split; DNA's paper numbers belong to that split only,
    the other models' to the public split."""
    from dfa_kernels.zoo import tasks
    from dfa_kernels.zoo.recipes import graph as R

    assert R.PRESETS["cpu"]["dna"]["groups"] == R.PRESETS["full"]["dna"]["groups"] == 16  # the paper's
    a, b = R.load_data("cora-stratified", 0), R.load_data("cora-stratified", 1)
    assert int(a.train_mask.sum()) == 542 and not torch.equal(a.train_mask, b.train_mask)
    assert torch.equal(a.train_mask, P.stratified_split(P.load_packaged("cora"), 0).train_mask)
    dna, gcn = tasks.get("dna-cora"), tasks.get("gcn-cora")
    assert dna.comparable(tasks.TrainConfig("dna-cora", data="cora-stratified"))
    assert not dna.comparable(tasks.TrainConfig("dna-cora"))  # the public split: not the paper's
    assert gcn.comparable(tasks.TrainConfig("gcn-cora"))
    assert not gcn.comparable(tasks.TrainConfig("gcn-cora", data="cora-stratified"))
    assert "stratified" in dna.paper_setting and "public" in gcn.paper_setting


def test_dna_run_records_feature_norm_and_split():
    from dfa_kernels.zoo import tasks
    from dfa_kernels.zoo.training import train

    cfg = tasks.TrainConfig(task="dna-cora", mode="dfa", epochs=2, progress=False, data="cora-stratified", seed=1)
    result = train(tasks.get("dna-cora"), cfg)
    assert all(h["val_h_norm"] > 0 for h in result.history)
    assert "random_state=1" in result.config["data"] and result.config["groups"] == 16


def _graph_report(task, data, comparable, paper_setting, seeds=(0, 1, 2)):
    def s(mean, paper):
        return {"mean": mean, "std": 0.01, "n": len(seeds), "seeds": list(seeds), "paper": paper}

    return {
        "task": task,
        "family": "graph",
        "metric": "test_acc",
        "data": data,
        "paper_comparable": comparable,
        "paper_setting": paper_setting,
        "summary": {
            "bp": s(0.8, 0.846 if comparable else None),
            "dfa": s(0.7, 0.829 if comparable else None),
            "dfa-ours": s(0.7, None),
            "shallow": s(0.3, 0.302 if comparable else None),
        },
        "runs": [],
        "provenance": {"git_sha": "abc"},
    }


def test_graph_tables_mark_dna_on_the_public_split_not_comparable():
    from dfa_kernels.zoo.tables import graph_tables

    reports = {
        "gcn-cora": _graph_report("gcn-cora", None, True, "Cora, public Planetoid split"),
        "dna-cora": _graph_report("dna-cora", None, False, "Cora, random stratified 20/20/60 split"),
        "dna-cora@cora-stratified": _graph_report("dna-cora", "cora-stratified", True, "stratified"),
    }
    text = "\n".join(graph_tables(reports))
    public, stratified = text.split("**Cora, random stratified")
    gcn_row = next(line for line in public.splitlines() if line.startswith("| gcn"))
    dna_row = next(line for line in public.splitlines() if line.startswith("| dna"))
    assert gcn_row.endswith("| 84.6 / 82.9 / 30.2 |")  # (the helper's paper numbers)
    assert dna_row.endswith("| not comparable |") and "84.6" not in dna_row
    assert "dna: the paper's numbers measure Cora, random stratified" in public
    dna_strat = next(line for line in stratified.splitlines() if line.startswith("| dna"))
    assert dna_strat.endswith("| 84.6 / 82.9 / 30.2 |")
