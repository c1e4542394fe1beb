"""Recommender tasks: FM, DeepFM, DCN, AutoInt and AFN on MovieLens-100k CTR (or a Criteo TSV).

``dfa-kernels train deepfm-ml100k --mode dfa`` trains on MovieLens-100k (label rating >= 4; each
user's ratings in time order split 80/10/10, see ``dfa_kernels.data.movielens``); ``--data PATH``
trains the same model on a Criteo TSV file instead (random 80/10/10; pass ``--epochs 1`` or 2 for
the full 45M-row file). Adam with the mode's own tuned learning rate; the test metrics are those
of the best epoch on validation AUC. Presets: "cpu" (the paper's depths with narrower layers:
a run takes 10-120 s on one shared CPU thread) and "full" (the paper's sizes).
"""
from __future__ import annotations

import copy
import functools
import math
import time

import torch
from torch import nn

from ..models.recsys import MODELS
from ..tasks import Task, TrainConfig, TrainResult, register

# Model sizes. "full" is the paper's; "cpu" keeps the structure (depths, heads, cross layers)
# with narrower layers (MLPs 128 or 256 wide, AFN's logarithmic layer 150) so that a run takes
# about a minute on one CPU thread. Dropout 0.5 on the MLPs of DeepFM (its paper's) and DCN.
PRESETS = {
    "full": {
        "fm": dict(embed_dim=10),
        "deepfm": dict(embed_dim=10, hidden=(400, 400, 400), dropout=0.5),
        "dcn": dict(embed_dim=16, cross_layers=6, hidden=(1024, 1024), dropout=0.5),
        "autoint": dict(embed_dim=16, layers=3, heads=2, d_att=32),
        "afn": dict(embed_dim=10, lnn=1500, hidden=(400, 400, 400)),
    },
    "cpu": {
        "fm": dict(embed_dim=10),
        "deepfm": dict(embed_dim=10, hidden=(128, 128, 128), dropout=0.5),
        "dcn": dict(embed_dim=16, cross_layers=6, hidden=(256, 256), dropout=0.5),
        "autoint": dict(embed_dim=16, layers=3, heads=2, d_att=32),
        "afn": dict(embed_dim=10, lnn=150, hidden=(128, 128, 128)),
    },
}
TRAIN = {"cpu": dict(epochs=8, batch_size=1024), "full": dict(epochs=8, batch_size=1024)}
# Adam learning rates per model and mode: the best validation AUC of {3e-4, 1e-3, 3e-3} (FM:
# {3e-3, 1e-2, 3e-2}) on MovieLens-100k, cpu preset, 8 epochs, seed 0.
LR = {
    "fm": {"bp": 1e-2, "dfa": 1e-2, "shallow": 1e-2},
    "deepfm": {"bp": 3e-3, "dfa": 3e-3, "shallow": 3e-3},
    "dcn": {"bp": 3e-3, "dfa": 3e-4, "shallow": 3e-3},
    "autoint": {"bp": 3e-3, "dfa": 3e-3, "shallow": 3e-3},
    "afn": {"bp": 1e-3, "dfa": 3e-4, "shallow": 3e-3},
}
# The paper's Criteo test AUC (Launay et al. 2020, "Direct Feedback Alignment Scales to Modern
# Deep Learning Tasks and Architectures").
PAPER = {
    "deepfm": {"bp": 0.7954, "dfa": 0.7956, "shallow": 0.7920},
    "dcn": {"bp": 0.8104, "dfa": 0.8009, "shallow": 0.7324},
    "afn": {"bp": 0.7933, "dfa": 0.7924, "shallow": 0.7859},
}
DESCRIPTIONS = {
    "fm": "factorization machine (BP baseline: no hidden layer, so every mode trains it exactly)",
    "deepfm": "DeepFM: FM + MLP 400x3 reading the embeddings detached",
    "dcn": "Deep & Cross: 6 cross layers + MLP 1024x2",
    "autoint": "AutoInt: 3 self-attention layers, 2 heads",
    "afn": "AFN: logarithmic layer 1500 + MLP 400x3",
}


@functools.lru_cache(maxsize=2)
def load_data(path: str | None = None):
    """MovieLens-100k (default), or a Criteo TSV file."""
    if path:
        from ..data.criteo import load_criteo
        return load_criteo(path)
    from ..data.movielens import load_movielens
    return load_movielens()


def build_model(name: str, data, mode: str = "dfa", preset: str = "cpu", seed: int = 0, **overrides):
    kwargs = {**PRESETS[preset][name], **overrides}
    if name != "fm":
        kwargs.update(mode=mode, seed=seed)
    return MODELS[name](data.vocab_size, data.num_fields, data.bags, **kwargs)


@torch.no_grad()
def evaluate(model, split, batch_size: int = 8192) -> tuple[float, float]:
    """(AUC, log loss) of the model on one split."""
    from sklearn.metrics import log_loss, roc_auc_score
    idx, bag, label = split
    model.eval()
    p = torch.cat([torch.sigmoid(model(i, g)[:, 0]) for i, g in
                   zip(idx.split(batch_size), bag.split(batch_size))]).double().cpu().numpy()
    y = label.cpu().numpy()
    return float(roc_auc_score(y, p)), float(log_loss(y, p.clip(1e-7, 1 - 1e-7), labels=[0, 1]))


def dfa_backend(model) -> str:
    dfa = getattr(model, "dfa", None)
    if dfa is None or dfa.mode == "bp":
        return "-"
    return dfa.resolved_backend(next(model.parameters()).device)


def fit(model, data, lr: float, epochs: int, batch_size: int, seed: int = 0, progress: bool = False):
    """Adam on BCE-with-logits; returns (history, test metrics of the best epoch on val AUC)."""
    from tqdm.auto import tqdm
    idx, bag, label = data.splits["train"]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=epochs * math.ceil(len(label) / batch_size), disable=not progress, leave=False)
    history, best, best_state = [], -1.0, None
    for epoch in range(1, epochs + 1):
        model.train()
        total, count = 0.0, 0
        for b in torch.randperm(len(label), generator=gen).split(batch_size):
            if len(b) < 2:
                continue                                   # BatchNorm needs 2 rows
            loss = nn.functional.binary_cross_entropy_with_logits(model(idx[b], bag[b])[:, 0], label[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(b), count + len(b)
            bar.update()
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}")
        val_auc, val_ll = evaluate(model, data.splits["val"])
        history.append({"epoch": epoch, "train_loss": total / max(count, 1),
                        "val_auc": val_auc, "val_logloss": val_ll})
        if val_auc > best:
            best, best_state = val_auc, copy.deepcopy(model.state_dict())
    bar.close()
    model.load_state_dict(best_state)
    test_auc, test_ll = evaluate(model, data.splits["test"])
    best_epoch = max(history, key=lambda h: h["val_auc"])["epoch"]
    return history, {"test_auc": test_auc, "test_logloss": test_ll, "best_epoch": best_epoch}


def run_model(name: str, config: TrainConfig) -> TrainResult:
    data = load_data(config.data).to(config.device)
    torch.manual_seed(config.seed)
    mode = "bp" if name == "fm" else config.mode
    model = build_model(name, data, mode=mode, preset=config.preset, seed=config.seed).to(config.device)
    train = TRAIN[config.preset]
    epochs = config.epochs or train["epochs"]
    lr = config.lr or LR[name][mode]
    start = time.perf_counter()
    history, final = fit(model, data, lr, epochs, train["batch_size"], config.seed, config.progress)
    final["train_seconds"] = round(time.perf_counter() - start, 1)
    hp = {"model": name, "mode": mode, "preset": config.preset, **PRESETS[config.preset][name],
          "optimizer": "Adam", "lr": lr, "epochs": epochs, "batch_size": train["batch_size"],
          "seed": config.seed, "data": config.data or "movielens-100k (per-user temporal 80/10/10)",
          "selection": "best epoch on val AUC",
          "parameters": sum(p.numel() for p in model.parameters())}
    if name == "fm" and config.mode != "bp":
        hp["note"] = f"FM has no hidden layer: mode {config.mode!r} trains it exactly, like bp"
    if config.preset == "cpu":
        hp["preset_note"] = "cpu preset: paper's depths, narrower layers (see 'full' for the paper's sizes)"
    return TrainResult(history=history, final=final, backend=dfa_backend(model), config=hp)


for _name in MODELS:
    register(Task(
        name=f"{_name}-ml100k", family="recsys",
        description=DESCRIPTIONS[_name] + " on MovieLens-100k CTR (--data PATH: a Criteo TSV file); "
                    "paper numbers: Criteo test AUC",
        metric="test_auc", higher_is_better=True,
        run=functools.partial(run_model, _name), paper=PAPER.get(_name, {})))
