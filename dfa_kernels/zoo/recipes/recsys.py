"""Recommender tasks: FM, DeepFM, DCN, AutoInt and AFN on MovieLens-100k CTR (or a Criteo TSV).

``dfa-kernels train deepfm-ml100k --mode dfa`` trains on MovieLens-100k (label rating >= 4; each
user's ratings in time order split 80/10/10, see ``dfa_kernels.data.movielens``); ``--data PATH``
trains the same model on a Criteo TSV file instead (random 80/10/10; pass ``--epochs 1`` or 2 for
the full 45M-row file). Adam with the mode's own tuned learning rate (:data:`LR`, tuned on validation
AUC with the same grid size for every mode: ``dfa-kernels tune``); up to ``EPOCHS`` epochs,
stopping after ``PATIENCE`` epochs without a better validation AUC (the paper's rule, patience 3),
the same for every mode; the test metrics are those of the best epoch on validation AUC. Presets:
"cpu" (the paper's depths with narrower layers) and "full" (the paper's sizes).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..models.recsys import MODELS
from ..tasks import Task, TrainConfig, only_base_modes, register, set_feedback, tuned_as
from ..trainer import Run, Shuffled, shard_rows

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
BATCH_SIZE = 1024
EPOCHS = {"cpu": 30, "full": 30}  # the budget; early stopping usually ends a run well before
PATIENCE = 3
PROBE_ROWS = 512  # the alignment measurement's batch (paper 1: 512 samples)
# The tuning grid of Adam's learning rate, the same three candidates for every mode
# (`dfa-kernels tune MODEL-ml100k`: validation AUC on MovieLens-100k, cpu preset, seed 0).
LR_GRID = {"default": (3e-4, 1e-3, 3e-3), "fm": (3e-3, 1e-2, 3e-2)}
# The tuned learning rates per model and mode: the grid's best on validation.
LR = {
    "fm": {"bp": 1e-2, "dfa": 1e-2, "shallow": 1e-2},
    # DeepFM's family rates: benchmarks/results/zoo/family/deepfm-ml100k.tuning.json (same grid)
    "deepfm": {
        "bp": 3e-3,
        "dfa": 3e-3,
        "shallow": 3e-3,
        "sdfa": 3e-3,
        "ternary": 3e-3,
        "dkp": 3e-3,
        "fdfa": 3e-3,  # deepfm-ml100k.fdfa.tuning.json
        "fa": 1e-3,
        "usf": 3e-4,
        "brsf": 3e-4,
        "frsf": 3e-4,
    },
    "dcn": {"bp": 3e-3, "dfa": 3e-4, "shallow": 3e-3},
    "autoint": {"bp": 3e-3, "dfa": 1e-3, "shallow": 3e-3},
    "afn": {"bp": 1e-3, "dfa": 3e-4, "shallow": 3e-3},
}
# The paper's Criteo test AUC (Launay et al. 2020, "Direct Feedback Alignment Scales to Modern
# Deep Learning Tasks and Architectures").
PAPER_SETTING = "Criteo (random 80/10/10 split): test AUC"
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
def evaluate(model, split, batch_size: int = 8192) -> dict:
    """AUC and log loss of the model on one split (idx, bag, label)."""
    from sklearn.metrics import log_loss, roc_auc_score

    idx, bag, label = split
    model.eval()
    p = (
        torch.cat([torch.sigmoid(model(i, g)[:, 0]) for i, g in zip(idx.split(batch_size), bag.split(batch_size))])
        .double()
        .cpu()
        .numpy()
    )
    y = label.cpu().numpy()
    return {"auc": float(roc_auc_score(y, p)), "logloss": float(log_loss(y, p.clip(1e-7, 1 - 1e-7), labels=[0, 1]))}


def build(name: str, config: TrainConfig) -> Run:
    data = load_data(config.data).to(config.device)
    torch.manual_seed(config.seed)
    mode = "bp" if name == "fm" else config.mode
    model = build_model(name, data, mode=mode, preset=config.preset, seed=config.seed).to(config.device)
    set_feedback(model, config.feedback)
    lr = config.lr or (config.hp or {}).get("lr", tuned(name, config)["lr"])
    idx, bag, label = data.splits["train"]
    batches = Shuffled(len(label), BATCH_SIZE, seed=config.seed, min_size=2)  # BatchNorm needs 2 rows

    def loss(model, rows):
        return nn.functional.binary_cross_entropy_with_logits(model(idx[rows], bag[rows])[:, 0], label[rows])

    hp = {
        "model": name,
        "mode": mode,
        "preset": config.preset,
        **PRESETS[config.preset][name],
        "optimizer": "Adam",
        "lr": lr,
        "epochs_max": config.epochs or EPOCHS[config.preset],
        "patience": PATIENCE,
        "batch_size": BATCH_SIZE,
        "seed": config.seed,
        "feedback": config.feedback,
        "data": config.data or "movielens-100k (per-user temporal 80/10/10)",
        "selection": "best epoch on val AUC",
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if name == "fm" and config.mode != "bp":
        hp["note"] = f"FM has no hidden layer: mode {config.mode!r} trains it exactly, like bp"
    if config.preset == "cpu":
        hp["preset_note"] = "cpu preset: paper's depths, narrower layers (see 'full' for the paper's sizes)"

    @torch.no_grad()
    def represent(model, rows: int = 2000):
        if not hasattr(model, "dfa"):
            raise ValueError(f"{name} has no feedback point: no hidden layer to embed")
        model.eval()
        t_idx, t_bag, t_label = (t[:rows] for t in data.splits["test"])
        with model.dfa.capture() as cap:
            model(t_idx, t_bag)
        return (
            cap.points[-1].tensor.flatten(1).cpu(),
            t_label.long().cpu(),
            ["no click", "click"],
            f"the first {rows} test rows at the last hidden layer (the last feedback point), coloured by label",
        )

    return Run(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=lr),
        batches=batches,
        loss=loss,
        evaluate=lambda model, split: evaluate(model, data.splits[split]),
        select="auc",
        higher_is_better=True,
        epochs=config.epochs or EPOCHS[config.preset],
        steps_per_epoch=len(batches),
        patience=PATIENCE,
        probe=torch.arange(min(PROBE_ROWS, len(label))),
        hyper_parameters=hp,
        represent=represent,
        shard=shard_rows,
        io=lambda rows: ((idx[rows], bag[rows]), label[rows]),
    )


def grid(name: str, config: TrainConfig) -> list[dict]:
    return [dict(lr=lr) for lr in LR_GRID.get(name, LR_GRID["default"])]


def tuned(name: str, config: TrainConfig) -> dict:
    if name == "fm":
        return dict(lr=LR[name]["bp"])
    return dict(lr=LR[name].get(config.mode, LR[name][tuned_as(config.mode)]))


def unsupported(name: str) -> dict[str, str]:
    """The family's methods a model does not train, and why (DeepFM trains the family)."""
    if name != "deepfm":
        return only_base_modes(NOT_WIRED)
    return {"drtp": "one logit (binary click-through): no one-hot class target for DRTP to project"}


def comparable(config: TrainConfig) -> bool:
    """The paper's numbers are Criteo's: comparable only when --data is a Criteo file."""
    return config.data is not None


NOT_WIRED = "not wired for this model yet: its tuned values and tests cover bp, dfa and shallow"

for _name in MODELS:
    register(
        Task(
            name=f"{_name}-ml100k",
            family="recsys",
            description=DESCRIPTIONS[_name] + " on MovieLens-100k CTR (--data PATH: a Criteo TSV file); "
            "paper numbers: Criteo test AUC",
            metric="test_auc",
            higher_is_better=True,
            build=functools.partial(build, _name),
            paper=PAPER.get(_name, {}),
            paper_setting=PAPER_SETTING,
            comparable=comparable,
            grid=functools.partial(grid, _name),
            tuned=functools.partial(tuned, _name),
            unsupported=unsupported(_name),
        )
    )
