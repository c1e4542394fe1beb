"""Transformer language-model tasks: a causal byte-level Transformer on Shakespeare or Python docs.

``dfa-kernels train lm-shakespeare --mode dfa --placement micro`` (or ``macro``, or ``linear``: a point
at every linear and LayerNorm output, shared feedback) trains the decoder-only
Transformer of :mod:`dfa_kernels.models.transformer` on Shakespeare's plays (validation and test:
whole plays never seen in training); ``--data PATH`` trains it on a WikiText-style corpus instead
(a directory with wiki.{train,valid,test}.tokens, or one text file). ``lm-pydoc`` is a small model
on Python's documentation (always available, seconds to train). ``--mode`` takes every method of
the random-feedback family but DRTP (:data:`UNSUPPORTED`): the direct ones (sdfa, ternary, dkp) at
DFA's points, following ``--placement``; the layer-wise ones (fa, usf, brsf, frsf) on every linear,
the head included, with exact gradients through attention's products, the LayerNorms and into the
embeddings. A method a preset has not tuned takes DFA's grid and rates (``tasks.tuned_as``).

Training: a fixed number of steps of random windows, the same budget for every mode (the cosine
schedule sets the run's length); an "epoch" is ``steps_per_epoch`` steps followed by a validation
pass. Adam (beta2 0.999, as in the paper), gradient clipping, and either a warmup + cosine
schedule (cpu presets: short runs) or the paper's plateau decay ("full").
The layers after the last feedback point (final LN + head: exact gradients in every mode) have
their own learning rate, ``head_lr``; in the "cpu" preset's mode dfa the hidden layers take a
smaller one than the head (DFA's updates are noisy until they align). ``--lr`` sets the hidden
layers' rate (every layer's in bp and shallow, and in every mode of the tied presets). The DFA
error is taken at the final hidden state (d_model wide); ``error_at="logits"`` takes it after the
head (a vocabulary-wide error). Metrics are in nats per token (byte-level: per byte); perplexity
is exp(loss). The model kept is the one with the best validation loss, and its test loss is the
reported metric.

Presets (lm-shakespeare; ``benchmarks/lm_ablations.py`` runs the cpu ones side by side):

- "cpu": 4 layers x 128, GPT-2 style (pre-LN, learned positions, GELU), 300 steps of 32 x 128
  bytes, cosine; DFA's head at 1e-2 against its body's 1e-4 (the zoo's tuning), BP's and
  shallow's tied (about 2 minutes per mode on one idle CPU core).
- "cpu-tied": the same with one learning rate for every parameter in every mode (paper 1's code),
  tuned on one grid for every mode (:data:`TIED_GRID`).
- "cpu-paper": "cpu-tied" with paper 1's architecture (post-LN, sinusoidal positions, embeddings
  times sqrt(d), ReLU, head bias, its initialisation: :data:`~..models.transformer.PAPER_ARCHITECTURE`),
  retuned on the same grid.
- "full": paper 1's Transformer and one row of its Table 5 exactly, the row of DFA's best
  WikiText-103 result (macro 52.0, micro 93.3 perplexity), which the paper's code runs as
  ``train_lm.py --dfa simple --optim schedule --init_lr 1e-4 --beta2 0.999``: 6 layers x 512,
  8 heads, d_ff 2048, dropout 0.1, context 128, batch 64; Adam (0.9, 0.999, eps 1e-9) at 1e-4 for
  every parameter, divided by 5 when the validation loss has not improved for one epoch
  (ReduceLROnPlateau, factor 0.2, patience 1), gradients clipped at norm 0.5, an epoch one pass of
  the training tokens, at most 100 epochs, early stopping after 5 without improvement; fp32.
  Every mode takes that row's recipe (the paper's BP, 29.8, came from another row: the original
  Transformer's Noam schedule with beta2 0.98). Departures: :data:`FULL_DEPARTURES`.
"""

from __future__ import annotations

import functools
import math

import torch

from ...methods import DIRECT
from ..models.transformer import PAPER_ARCHITECTURE, PLACEMENTS, TransformerLM
from ..tasks import Task, TrainConfig, register, set_feedback, tuned_as
from ..trainer import Run, Sampled, shard_rows

# TransformerLM arguments per task and preset (the DFA error at the final hidden state, the
# model's default).
_CPU_LM = dict(layers=4, d_model=128, heads=4, d_ff=512, context=128, dropout=0.0)
MODEL = {
    "lm-shakespeare": {
        "cpu": dict(_CPU_LM),
        "cpu-tied": dict(_CPU_LM),
        "cpu-paper": dict(_CPU_LM, **PAPER_ARCHITECTURE),
        # paper 1's train_lm.py defaults: --nlayers 6 --dmodel 512 --nheads 8 --dff 2048 --dropout 0.1
        # --chunk_length 128 (its model: transformer.py's LMTransformer)
        "full": dict(layers=6, d_model=512, heads=8, d_ff=2048, context=128, dropout=0.1, **PAPER_ARCHITECTURE),
    },
    "lm-pydoc": {
        "cpu": dict(layers=2, d_model=64, heads=2, d_ff=256, context=64, dropout=0.0),
        "full": dict(layers=6, d_model=256, heads=4, d_ff=1024, context=256, dropout=0.1),
    },
}
# steps = epochs * steps_per_epoch (None: one pass of the training tokens, batch_size * context
# per step); eval_tokens: tokens per validation/test pass (None: the whole split). Optional keys
# (defaults in build_lm): eps (Adam's), grad_clip, plateau (ReduceLROnPlateau's factor and
# patience), patience (early stopping, in epochs), autocast (bf16 on CUDA).
_CPU_TRAIN = dict(epochs=6, steps_per_epoch=50, batch_size=32, eval_tokens=65536, schedule="cosine")
TRAIN = {
    "lm-shakespeare": {
        "cpu": dict(_CPU_TRAIN),
        "cpu-tied": dict(_CPU_TRAIN),
        "cpu-paper": dict(_CPU_TRAIN),
        # paper 1's train_lm.py: --max_epochs 100 --patience 5 --batch_size 64, Adam eps 1e-9,
        # clip_grad_norm_ 0.5, --optim schedule: ReduceLROnPlateau(factor 0.2, patience 1); fp32
        "full": dict(
            epochs=100,
            steps_per_epoch=None,
            batch_size=64,
            eval_tokens=None,
            schedule="plateau",
            eps=1e-9,
            grad_clip=0.5,
            plateau=dict(factor=0.2, patience=1),
            patience=5,
            autocast=False,
        ),
    },
    "lm-pydoc": {
        "cpu": dict(epochs=8, steps_per_epoch=25, batch_size=16, eval_tokens=16384, schedule="cosine"),
        "full": dict(epochs=20, steps_per_epoch=500, batch_size=32, eval_tokens=None, schedule="plateau"),
    },
}
# Presets whose every parameter takes one learning rate in every mode (lr == head_lr), as in
# paper 1's code; their rates are tuned on TIED_GRID, the same for every mode.
TIED_PRESETS = {"lm-shakespeare": ("cpu-tied", "cpu-paper", "full"), "lm-pydoc": ()}
# Adam learning rates (lr, head_lr) per task, preset and (mode, placement). head_lr is that of the
# layers after the last feedback point (final LN + head), which learn from exact gradients in
# every mode; lr that of the rest (DFA-trained in mode dfa). cpu presets: tuned by us on
# validation loss (seed 0). full: the Table 5 row's 1e-4 for every parameter and every mode.
_PAPER_ROW = 1e-4
_FULL = {
    key: (_PAPER_ROW, _PAPER_ROW)
    for key in (("bp", "macro"), ("dfa", "macro"), ("dfa", "micro"), ("dfa", "linear"), ("shallow", "macro"))
}


def _tied(bp: float, dfa: float, shallow: float) -> dict:
    return {
        ("bp", "macro"): (bp, bp),
        **{("dfa", p): (dfa, dfa) for p in PLACEMENTS},
        ("shallow", "macro"): (shallow, shallow),
    }


def _family(**rates: float) -> dict:
    """Tied rates of family methods: a direct one's for every placement (tuned in macro, as DFA's)."""
    return {(m, p): (r, r) for m, r in rates.items() for p in (PLACEMENTS if m in DIRECT else ("macro",))}


LR = {
    # cpu: the winners of LR_GRID below (benchmarks/results/zoo/tuning/lm-shakespeare.json); cpu-tied
    # and cpu-paper: the winners of TIED_GRID (benchmarks/results/zoo/lm_ablations/tuning-PRESET.json;
    # DFA tuned in the macro placement, the others take its rate); lm-pydoc takes them untuned
    "lm-shakespeare": {
        "cpu": {
            ("bp", "macro"): (3e-3, 3e-3),
            ("dfa", "macro"): (1e-4, 1e-2),
            ("dfa", "micro"): (1e-4, 1e-2),
            ("dfa", "linear"): (1e-4, 1e-2),
            ("shallow", "macro"): (3e-2, 3e-2),
        },
        # the family's: benchmarks/results/zoo/family/lm-shakespeare.MODE.tuning.json (same grid)
        "cpu-tied": {
            **_tied(bp=3e-3, dfa=1e-2, shallow=3e-2),
            **_family(fa=3e-3, usf=1e-2, sdfa=3e-2, dkp=3e-3, ternary=0.03, frsf=0.01, brsf=0.01, fdfa=1e-2),
        },
        "cpu-paper": _tied(bp=3e-3, dfa=1e-3, shallow=3e-2),
        "full": _FULL,
    },
    "lm-pydoc": {
        "cpu": {
            ("bp", "macro"): (3e-3, 3e-3),
            ("dfa", "macro"): (1e-4, 1e-2),
            ("dfa", "micro"): (1e-4, 1e-2),
            ("dfa", "linear"): (1e-4, 1e-2),
            ("shallow", "macro"): (3e-2, 3e-2),
        },
        # untuned: the DFA rate paper 1 used with a constant rate (5e-5), a usual one for the others
        "full": {
            ("bp", "macro"): (3e-4, 3e-4),
            ("dfa", "macro"): (5e-5, 3e-4),
            ("dfa", "micro"): (5e-5, 3e-4),
            ("dfa", "linear"): (5e-5, 3e-4),
            ("shallow", "macro"): (3e-4, 3e-4),
        },
    },
}
# What the "full" preset does not take from paper 1 (the row's hyper-parameters it does take).
FULL_DEPARTURES = (
    "data: byte-level Shakespeare (or --data: WikiText files read as bytes) instead of WikiText-103 lowercased "
    "and cut by a 32k-token BPE, so its perplexities are not the paper's",
    "batches: random 128-token windows (an epoch: as many steps as one pass of the training tokens) instead of "
    "one pass through 64 contiguous streams",
    "initialisation: every block drawn independently (nn.TransformerEncoder gives every paper block the same "
    "initial weights)",
    "BP and shallow take the row's recipe: the paper ran that row for DFA only (its BP, 29.8, used the Noam "
    "schedule with beta2 0.98)",
)
# WikiText-103 test perplexity (Launay et al. 2020, "Direct Feedback Alignment Scales to Modern
# Deep Learning Tasks and Architectures"); "dfa" is macro placement (micro: 93.3).
PAPER = {"bp": 29.8, "dfa": 52.0, "shallow": 428.0}
PAPER_MICRO = 93.3
PAPER_SETTING = "WikiText-103 word-level test perplexity (DFA: macro placement; micro 93.3)"
PROBE_TOKENS = 512  # the alignment measurement's batch (paper 1: 512 samples; here tokens)


def placement_of(mode: str, placement: str) -> str:
    """The placement a mode trains with: the direct methods' points follow ``--placement``; bp,
    shallow and the layer-wise methods (no points) use macro's model."""
    return placement if mode in DIRECT else "macro"


def lrs(task: str, preset: str, mode: str, placement: str, lr: float | None = None) -> tuple[float, float]:
    """(lr, head_lr): the tuned pair (a family method the preset has not tuned takes the rates of
    the mode it starts from, :func:`~..tasks.tuned_as`), or `lr` for the hidden layers (for every
    layer in bp and shallow, and in every mode of the tied presets)."""
    table, placement = LR[task][preset], placement_of(mode, placement)
    tuned, head_lr = table.get((mode, placement), table[(tuned_as(mode), placement)])
    if lr is None:
        return tuned, head_lr
    return lr, (head_lr if tuned_as(mode) == "dfa" and preset not in TIED_PRESETS[task] else lr)


@functools.lru_cache(maxsize=4)
def load_data(task: str, path: str | None = None, tokenizer: str = "byte"):
    from ..data import text

    if path:
        return text.load_wikitext(path, tokenizer)
    return text.load_shakespeare(tokenizer) if task == "lm-shakespeare" else text.load_pydoc(tokenizer)


def build_model(
    task: str,
    vocab_size: int,
    mode: str = "dfa",
    placement: str = "macro",
    preset: str = "cpu",
    seed: int = 0,
    **overrides,
) -> TransformerLM:
    return TransformerLM(vocab_size, mode=mode, placement=placement, seed=seed, **{**MODEL[task][preset], **overrides})


def windows(tokens: torch.Tensor, context: int, batch_size: int, generator: torch.Generator):
    """Random windows ``(x, y)`` of ``[batch_size, context]``, y = x shifted by one."""
    start = torch.randint(0, len(tokens) - context - 1, (batch_size, 1), generator=generator)
    w = tokens[start + torch.arange(context + 1)]
    return w[:, :-1], w[:, 1:]


def loss_fn(model, x, y, autocast: bool = False):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        return model.loss(x, y)


@torch.no_grad()
def evaluate(
    model, tokens: torch.Tensor, max_tokens: int | None = None, batch_size: int = 32, autocast: bool = False
) -> float:
    """Mean next-token loss over non-overlapping windows, evenly spread over the split when capped."""
    T = model.context
    n = (len(tokens) - 1) // T
    if n < 1:
        raise ValueError(f"a split of {len(tokens)} tokens is shorter than one window of {T + 1}")
    keep = n if max_tokens is None else max(1, min(n, max_tokens // T))
    starts = torch.linspace(0, n - 1, keep).long() * T
    offsets = torch.arange(T + 1)
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for s in starts.split(batch_size):
        w = tokens[s[:, None] + offsets].to(device)
        total += loss_fn(model, w[:, :-1], w[:, 1:], autocast).item() * len(s)
    model.train()
    return total / keep


# The tuning grids (lr, head_lr), three candidates for every mode and placement (`dfa-kernels
# tune`: validation loss, cpu preset, seed 0): bp and shallow train every layer at one rate; DFA's
# hidden layers take a smaller rate than the exactly-trained final LN + head (head_lr 1e-2).
LR_GRID = {
    "bp": [dict(lr=r, head_lr=r) for r in (1e-3, 3e-3, 1e-2)],
    "shallow": [dict(lr=r, head_lr=r) for r in (3e-3, 1e-2, 3e-2)],
    "dfa": [dict(lr=r, head_lr=1e-2) for r in (1e-4, 3e-4, 1e-3)],
}
# Where the grids above differ between modes, and why (tests/test_fairness.py; the README lists them).
TUNING_DEPARTURES = {
    "lr": "DFA's hidden layers are searched a decade lower (their updates are noisy until they align; paper 1 "
    "used 5e-5); shallow's body does not learn, so its lr is its head's rate, searched one step higher",
    "head_lr": "bp and shallow tie the head's rate to lr; DFA's head is not tuned but fixed at 1e-2, inside "
    "shallow's range: an unequal budget that the LM ablations measure (benchmarks/lm_ablations.py: "
    "one rate for every parameter, one grid for every mode)",
}
# The tied presets' grid, the same six candidates for every mode: one rate for every parameter,
# the union of LR_GRID's rates.
TIED_RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
TIED_GRID = [dict(lr=r, head_lr=r) for r in TIED_RATES]


def grid(task: str, config: TrainConfig) -> list[dict]:
    return list(TIED_GRID) if config.preset in TIED_PRESETS[task] else LR_GRID[tuned_as(config.mode)]


def tuned(task: str, config: TrainConfig) -> dict:
    lr, head_lr = lrs(task, config.preset, config.mode, config.placement)
    return dict(lr=lr, head_lr=head_lr)


TOKEN_CLASSES = ("lowercase letter", "uppercase letter", "digit", "space or newline", "punctuation", "other")


def token_class(text: str) -> int:
    """Index in TOKEN_CLASSES of a decoded token (its first character)."""
    c = text[:1]
    checks = (
        str.islower,
        str.isupper,
        str.isdigit,
        str.isspace,
        lambda ch: ch.isprintable() and not ch.isalnum() and ch != "\ufffd",
    )  # U+FFFD: a partial UTF-8 byte
    return next((k for k, check in enumerate(checks) if c and check(c)), len(TOKEN_CLASSES) - 1)


def optimizer(model, lr: float, head_lr: float | None = None, eps: float = 1e-8) -> torch.optim.Adam:
    """Adam (betas 0.9, 0.999), the layers after the last feedback point (final LN, head: exact
    gradients in every mode) at head_lr (default lr), the others at lr."""
    head = [p for m in (model.ln_f, model.head) for p in m.parameters()]
    body = [p for p in model.parameters() if all(p is not q for q in head)]
    return torch.optim.Adam(
        [{"params": body, "lr": lr}, {"params": head, "lr": head_lr or lr}], betas=(0.9, 0.999), eps=eps
    )


def build_lm(task: str, config: TrainConfig, **model_overrides) -> Run:
    """One training run; `model_overrides` replace the preset's TransformerLM arguments."""
    if config.placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(map(repr, PLACEMENTS))}; got {config.placement!r}")
    data = load_data(task, config.data)
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    placement = placement_of(config.mode, config.placement)
    model = build_model(
        task, data.vocab_size, config.mode, placement, config.preset, config.seed, **model_overrides
    ).to(device)
    set_feedback(model, config.feedback)
    train = dict(TRAIN[task][config.preset])
    if config.epochs:
        train["epochs"] = config.epochs
    lr, head_lr = lrs(task, config.preset, config.mode, placement, config.lr)
    lr, head_lr = (config.hp or {}).get("lr", lr), (config.hp or {}).get("head_lr", head_lr)
    autocast = device.type == "cuda" and torch.cuda.is_bf16_supported() and train.get("autocast", True)
    eps, clip = train.get("eps", 1e-8), train.get("grad_clip", 1.0)
    opt = optimizer(model, lr, head_lr, eps)
    tokens = data.splits["train"]
    if train["steps_per_epoch"] is None:  # an epoch: one pass of the training tokens
        train["steps_per_epoch"] = max(1, len(tokens) // (train["batch_size"] * model.context))
    total_steps = train["epochs"] * train["steps_per_epoch"]
    scheduler = plateau = None
    if train["schedule"] == "cosine":
        warmup = max(1, total_steps // 20)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / total_steps)))),
        )
    else:
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **train.get("plateau", dict(factor=0.5, patience=1)))

    def loss(model, batch):
        x, y = batch
        return loss_fn(model, x.to(device), y.to(device), autocast)

    def evaluate_split(model, split):
        value = evaluate(model, data.splits[split], train["eval_tokens"], autocast=autocast)
        return {"loss": value, "ppl": math.exp(value)}

    hp = {
        "task": task,
        "mode": config.mode,
        "placement": placement,
        "error_at": model.error_at,
        "preset": config.preset,
        **MODEL[task][config.preset],
        **model_overrides,
        **train,
        "optimizer": "Adam",
        "betas": [0.9, 0.999],
        "eps": eps,
        "lr": lr,
        "head_lr": head_lr,
        "grad_clip": clip,
        "seed": config.seed,
        "feedback": config.feedback,
        "feedback_points": model.num_points,
        "parameters": sum(p.numel() for p in model.parameters()),
        "data": data.info,
        "loss_unit": f"nats per {'byte' if data.tokenizer == 'byte' else 'character'}",
        "selection": "best epoch on validation loss",
        "stopping": (
            "fixed budget (the lr schedule's length)"
            if train.get("patience") is None
            else f"{train['patience']} epochs without a better validation loss, or the budget"
        ),
    }
    if task == "lm-shakespeare" and config.preset == "full":
        hp["departures"] = list(FULL_DEPARTURES)
    if placement != config.placement:
        hp["note"] = f"placement only applies to the direct methods; mode {config.mode!r} ignores it"

    @torch.no_grad()
    def represent(model, count: int = 64):
        """The token embeddings of the `count` most frequent tokens of the training split."""
        top = torch.bincount(tokens, minlength=data.vocab_size).argsort(descending=True)[:count]
        names = [data.decode([int(t)]) for t in top]
        labels = [token_class(name) for name in names]
        return (
            model.tok.weight[top.to(model.tok.weight.device)].cpu(),
            labels,
            list(TOKEN_CLASSES),
            f"the token embeddings of the {count} most frequent tokens, coloured by kind",
        )

    context, batch_size = model.context, train["batch_size"]
    probe = windows(tokens, context, max(1, PROBE_TOKENS // context), torch.Generator().manual_seed(config.seed + 1))
    return Run(
        model=model,
        optimizer=opt,
        batches=Sampled(lambda g: windows(tokens, context, batch_size, g), config.seed),
        loss=loss,
        evaluate=evaluate_split,
        select="loss",
        higher_is_better=False,
        epochs=train["epochs"],
        steps_per_epoch=train["steps_per_epoch"],
        scheduler=scheduler,
        plateau=plateau,
        clip_grad=clip,
        probe=probe,
        hyper_parameters=hp,
        represent=represent,
        shard=shard_rows,
        patience=train.get("patience"),
    )


# The LM trains the family, except DRTP: it projects the one-hot class target in place of the
# error, and the error here is the d_model-wide gradient at the final hidden state, not a
# vocabulary-wide one (error_at="logits" would give it one; that model is not the zoo's).
UNSUPPORTED = {
    "drtp": "the DFA error is taken at the final hidden state (d_model wide); DRTP's one-hot next-token "
    "target is vocabulary-wide, so there is no target of the error's width to project"
}

register(
    Task(
        name="lm-shakespeare",
        family="transformer",
        description="causal Transformer LM (byte-level) on Shakespeare, split by play; --placement macro|micro|linear; "
        "--data PATH: WikiText-style text. Paper: WikiText-103 perplexity (DFA micro: 93.3)",
        metric="test_loss",
        higher_is_better=False,
        build=functools.partial(build_lm, "lm-shakespeare"),
        paper=dict(PAPER),
        paper_setting=PAPER_SETTING,
        grid=functools.partial(grid, "lm-shakespeare"),
        tuned=functools.partial(tuned, "lm-shakespeare"),
        unsupported=dict(UNSUPPORTED),
        presets=MODEL["lm-shakespeare"],
    )
)
register(
    Task(
        name="lm-pydoc",
        family="transformer",
        description="small causal Transformer LM (byte-level) on Python's pydoc topics (seconds; always available)",
        metric="test_loss",
        higher_is_better=False,
        build=functools.partial(build_lm, "lm-pydoc"),
        paper_setting=PAPER_SETTING,
        grid=functools.partial(grid, "lm-pydoc"),
        tuned=functools.partial(tuned, "lm-pydoc"),
        unsupported=dict(UNSUPPORTED),
        presets=MODEL["lm-pydoc"],
    )
)
