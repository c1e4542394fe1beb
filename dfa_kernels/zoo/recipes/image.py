"""Image task: a small CNN on scikit-learn's bundled digits (``cnn-digits``), offline.

``dfa-kernels train cnn-digits --mode fa`` trains :class:`~..models.image.DigitsCNN` (conv-conv-fc)
on ``sklearn.datasets.load_digits`` (1797 grey 8x8 images of 10 digits, shipped inside
scikit-learn: no download), split once, stratified by class, 60/20/20 into train/validation/test
with split seed 0 (the run's seed changes the initialisation, the feedback matrices and the batch
order, never the split). Pixels are divided by 16 (their maximum) and standardised with the
training images' mean and std. Adam, batches of 32, up to ``EPOCHS`` epochs, stopping after
``PATIENCE`` epochs without a better validation accuracy, the same for every method; the test
accuracy is the best validation epoch's. Every method of the family trains it (it has class
targets for drtp; its layers are nn.Conv2d and nn.Linear for the layer-wise methods). There is no
published number for this network and split: the tables say "not comparable".
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..models.image import DigitsCNN
from ..tasks import Task, TrainConfig, register, set_feedback, tuned_as
from ..trainer import Run, Shuffled, shard_rows

PRESETS = {"cpu": dict(channels=(16, 32)), "full": dict(channels=(32, 64))}
EPOCHS = {"cpu": 40, "full": 100}
PATIENCE = 10
BATCH_SIZE = 32
SPLIT_SEED = 0
PROBE_ROWS = 512
# The tuning grid of Adam's learning rate, the same three candidates for every method
# (`dfa-kernels tune cnn-digits --modes ...`: validation accuracy, cpu preset, seed 0).
LR_GRID = (3e-4, 1e-3, 3e-3)
# The tuned learning rate per method: the grid's best on validation (benchmarks/results/zoo/family/
# cnn-digits.tuning.json).
LR = {
    "bp": 3e-3,
    "dfa": 3e-3,
    "shallow": 3e-3,
    "sdfa": 3e-4,
    "drtp": 3e-3,
    "ternary": 3e-4,
    "dkp": 3e-3,
    "fdfa": 1e-3,  # cnn-digits.fdfa.tuning.json
    "fa": 1e-3,
    "usf": 3e-3,
    "brsf": 3e-3,
    "frsf": 3e-3,
}


def tuned_lr(mode: str) -> float:
    """The mode's tuned rate; a method not tuned here yet starts from dfa's (tasks.tuned_as)."""
    return LR.get(mode, LR[tuned_as(mode)])


@functools.lru_cache(maxsize=1)
def load_data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{split: (images [n, 1, 8, 8] float32, labels [n] int64)}, stratified 60/20/20, split seed 0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x, y = digits.images / 16.0, digits.target
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.4, stratify=y, random_state=SPLIT_SEED)
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=SPLIT_SEED
    )
    mean, std = x_train.mean(), x_train.std()
    return {
        split: (torch.tensor((xs - mean) / std, dtype=torch.float32).unsqueeze(1), torch.tensor(ys))
        for split, xs, ys in (("train", x_train, y_train), ("val", x_val, y_val), ("test", x_test, y_test))
    }


@torch.no_grad()
def evaluate(model, images: torch.Tensor, labels: torch.Tensor) -> dict:
    model.eval()
    logits = model(images)
    return {"acc": (logits.argmax(1) == labels).float().mean().item(), "loss": F.cross_entropy(logits, labels).item()}


def build(config: TrainConfig) -> Run:
    device = torch.device(config.device)
    data = {k: (x.to(device), y.to(device)) for k, (x, y) in load_data().items()}
    torch.manual_seed(config.seed)
    model = DigitsCNN(**PRESETS[config.preset], mode=config.mode, seed=config.seed).to(device)
    set_feedback(model, config.feedback)
    lr = config.lr or (config.hp or {}).get("lr", tuned_lr(config.mode))
    x, y = data["train"]
    batches = Shuffled(len(y), BATCH_SIZE, seed=config.seed)

    def loss(model, rows):
        return F.cross_entropy(model(x[rows]), y[rows])

    @torch.no_grad()
    def represent(model):
        model.eval()
        images, labels = data["test"]
        return (
            model.features(images).flatten(1).cpu(),
            labels.cpu(),
            [str(d) for d in range(10)],
            "the test images at the last convolution's feedback point, coloured by digit",
        )

    epochs = config.epochs or EPOCHS[config.preset]
    hp = {
        "model": "DigitsCNN",
        "mode": config.mode,
        "preset": config.preset,
        **PRESETS[config.preset],
        "optimizer": "Adam",
        "lr": lr,
        "epochs_max": epochs,
        "patience": PATIENCE,
        "batch_size": BATCH_SIZE,
        "seed": config.seed,
        "feedback": config.feedback,
        "data": f"sklearn load_digits, stratified 60/20/20 (train_test_split, random_state={SPLIT_SEED})",
        "selection": "best epoch on validation accuracy",
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return Run(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=lr),
        batches=batches,
        loss=loss,
        evaluate=lambda model, split: evaluate(model, *data[split]),
        select="acc",
        higher_is_better=True,
        epochs=epochs,
        steps_per_epoch=len(batches),
        patience=PATIENCE,
        probe=torch.arange(min(PROBE_ROWS, len(y)), device=device),
        hyper_parameters=hp,
        represent=represent,
        shard=shard_rows,
        targets=lambda rows: y[rows],
    )


register(
    Task(
        name="cnn-digits",
        family="image",
        description="small CNN (conv-conv-fc) on scikit-learn's digits (8x8, 1797 images, stratified 60/20/20)",
        metric="test_acc",
        higher_is_better=True,
        build=build,
        paper_setting="no published number for this network",
        grid=lambda config: [dict(lr=lr) for lr in LR_GRID],
        tuned=lambda config: dict(lr=tuned_lr(config.mode)),
    )
)
