"""dk.convert: where points go (globs, types, callables, library activations), models that return
mappings or tuples, shared modules, eval mode, a CNN, and the residual-stream check."""

import collections
import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfa_kernels as dk
from dfa_kernels.convert import HybridGradientWarning, glob_regex, is_activation


def _loss(y, target):
    return F.cross_entropy(y, target)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class HandMLP(nn.Module):
    """The same network as `_seq()`, written with dfa.point by hand: the reference for conversion."""

    def __init__(self, seq, dfa):
        super().__init__()
        self.seq, self.dfa = seq, dfa

    def forward(self, x):
        s = self.seq
        h = self.dfa.point(s[1](s[0](x)))
        h = self.dfa.point(s[3](s[2](h)))
        return self.dfa(s[4](h))


def _seq():
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.GELU(), nn.Linear(12, 3))


# ---------------------------------------------------------------- basics (moved from test_nn.py)
def test_convert_inserts_points_and_keeps_outputs():
    net = _seq()
    x = torch.randn(5, 6)
    converted = dk.convert(net, mode="dfa", seed=3)
    torch.testing.assert_close(converted(x), net(x))
    assert converted.points == ("1", "3")
    assert converted.dfa.spec.widths == (16, 12)
    _loss(converted(x), torch.randint(0, 3, (5,))).backward()
    assert all(p.grad is not None for p in converted.parameters())
    only_linear = dk.convert(net, after=(nn.Linear,))
    assert only_linear.points == ("0", "2", "4")
    with pytest.raises(ValueError, match="found no activation modules"):
        dk.convert(nn.Sequential(nn.Linear(2, 2)))
    converted.dfa.mode = "bp"
    converted.zero_grad()
    _loss(converted(x), torch.zeros(5, dtype=torch.long)).backward()
    net.zero_grad()
    _loss(net(x), torch.zeros(5, dtype=torch.long)).backward()
    for p, q in zip(converted.model.parameters(), net.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_converted_dfa_gradients_equal_the_hand_written_model():
    seq = _seq()
    x, target = torch.randn(7, 6), torch.randint(0, 3, (7,))
    converted = dk.convert(seq, seed=11)
    hand = HandMLP(copy.deepcopy(seq), dk.DFA(seed=11))
    for model in (converted, hand):
        _loss(model(x), target).backward()
    for (name, p), q in zip(converted.model.named_parameters(), hand.seq.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    # and not the backprop gradient: the first layer's differs
    seq.zero_grad()
    _loss(seq(x), target).backward()
    assert not torch.allclose(seq[0].weight.grad, converted.model[0].weight.grad)


def test_parameter_names_unchanged_and_state_dict_round_trip():
    seq = _seq()
    converted = dk.convert(seq, points=nn.Linear)
    assert [n for n, _ in converted.model.named_parameters()] == [n for n, _ in seq.named_parameters()]
    keys = set(converted.state_dict())
    assert keys == {f"model.{k}" for k in seq.state_dict()} | {"dfa._extra_state"}
    converted.model.load_state_dict(seq.state_dict())  # the original's weights load as they are


def test_convert_fuse_folds_linear_and_activation():  # moved from test_fused.py
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(6, 16),
        nn.ReLU(),
        nn.Linear(16, 12),
        nn.GELU(approximate="tanh"),
        nn.Linear(12, 8),
        nn.Tanh(),
        nn.Linear(8, 3),
    )
    x, target = torch.randn(5, 6), torch.randint(0, 3, (5,))
    plain = dk.convert(net, seed=3)
    fused = dk.convert(net, seed=3, fuse=True)
    assert [type(m).__name__ for m in fused.model] == [
        "DFALinear",
        "Identity",
        "Linear",
        "GELU",
        "DFALinear",
        "Identity",
        "Linear",
    ]
    assert fused.model[0].activation == "relu" and fused.model[4].activation == "tanh"
    assert fused.state_dict().keys() == plain.state_dict().keys() == dk.convert(net).state_dict().keys()
    torch.testing.assert_close(fused(x), net(x))
    for model in (plain, fused):
        F.cross_entropy(model(x), target).backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)
    assert fused.dfa.spec.widths == plain.dfa.spec.widths == (16, 12, 8)


# ---------------------------------------------------------------- points=
class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_glob_star_is_one_name_component():
    assert glob_regex("layers.*").match("layers.0")
    assert not glob_regex("layers.*").match("layers.0.1")
    assert glob_regex("layers.**").match("layers.0.1")
    assert glob_regex("**.1").match("layers.2.1")
    assert glob_regex("layers.[02]").match("layers.2") and not glob_regex("layers.[02]").match("layers.1")
    assert glob_regex("layers.[!0]").match("layers.1") and not glob_regex("layers.[!0]").match("layers.0")
    assert glob_regex("la?ers.0").match("layers.0")


@pytest.mark.parametrize(
    "points, expected",
    [
        ("layers.*", ("layers.0", "layers.1", "layers.2")),
        (["layers.0", "layers.2.1"], ("layers.0", "layers.2.1")),
        ("layers.*.1", ("layers.0.1", "layers.1.1", "layers.2.1")),
        (nn.Tanh, ("layers.0.1", "layers.1.1", "layers.2.1")),
        ((nn.Linear,), ("inp", "layers.0.0", "layers.1.0", "layers.2.0", "head")),
        (lambda name, m: name in ("inp", "layers.1"), ("inp", "layers.1")),
        (["inp", nn.Tanh], ("inp", "layers.0.1", "layers.1.1", "layers.2.1")),
    ],
)
def test_points_by_glob_type_and_callable(points, expected):
    model = Blocks()
    x = torch.randn(5, 4)
    converted = dk.convert(model, points=points)
    assert set(converted.points) == set(expected)
    torch.testing.assert_close(converted(x), model(x))
    assert len(converted.dfa.spec.widths) == len(expected)


def test_glob_matching_nothing_names_the_glob():
    with pytest.raises(ValueError, match=r"points: the glob 'layer\.\*' matches no module name.*layers"):
        dk.convert(Blocks(), points="layer.*")
    with pytest.raises(TypeError, match="points must be module-name globs"):
        dk.convert(Blocks(), points=[3])
    with pytest.raises(TypeError, match="not both"):
        dk.convert(Blocks(), points="layers.*", after=(nn.Tanh,))


def _library_class(module_name, class_name, base=nn.Module):
    """A class that looks like a library's activation (its __module__), without the library."""
    return type(class_name, (base,), {"__module__": module_name, "forward": lambda self, x: torch.tanh(x)})


def test_activation_modules_of_transformers_and_timm_count_without_importing_them():
    NewGELU = _library_class("transformers.activations", "NewGELUActivation")
    Swish = _library_class("timm.layers.activations_me", "SwishMe")
    Linear = _library_class("transformers.activations", "LinearActivation")
    assert is_activation(NewGELU()) and is_activation(Swish()) and not is_activation(Linear())
    assert is_activation(nn.GELU()) and not is_activation(nn.Linear(2, 2))
    net = nn.Sequential(
        nn.Linear(4, 8), NewGELU(), nn.Linear(8, 8), Swish(), nn.Linear(8, 8), Linear(), nn.Linear(8, 2)
    )
    assert dk.convert(net).points == ("1", "3")


def test_real_transformers_activations_count():
    activations = pytest.importorskip("transformers.activations")
    for name in ("NewGELUActivation", "GELUActivation", "SiLUActivation", "QuickGELUActivation"):
        if hasattr(activations, name):
            assert is_activation(getattr(activations, name)()), name
    assert not is_activation(activations.LinearActivation())


# ---------------------------------------------------------------- outputs that are not a tensor
class DictModel(nn.Module):
    def __init__(self, with_loss=False):
        super().__init__()
        self.body, self.head, self.aux = nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Linear(8, 3), nn.Linear(8, 2)
        self.with_loss = with_loss

    def forward(self, x, target=None):
        h = self.body(x)
        out = {"features": h, "logits": self.head(h), "aux": self.aux(h)}
        if target is not None:
            out["loss"] = F.cross_entropy(out["logits"], target)
        return out


Pair = collections.namedtuple("Pair", "extra logits")


class TupleModel(nn.Module):
    def __init__(self, named=False):
        super().__init__()
        self.body, self.head = nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Linear(8, 3)
        self.named = named

    def forward(self, x):
        y = self.head(self.body(x))
        return Pair("meta", y) if self.named else (y, "meta", 7)


def test_dict_output_wraps_logits_and_passes_the_rest():
    model, x, target = DictModel(), torch.randn(6, 4), torch.randint(0, 3, (6,))
    converted = dk.convert(model, seed=1)
    out, ref = converted(x), model(x)
    assert set(out) == set(ref)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k])
    _loss(out["logits"], target).backward()
    assert model.body[0].weight.grad is None and converted.model.body[0].weight.grad is not None
    # output= picks another entry
    other = dk.convert(model, output="aux")
    _loss(other(x)["aux"], target % 2).backward()
    assert other.dfa.spec.out_features == 2
    with pytest.raises(ValueError, match=r"output='nope' is not a key of the model's output"):
        dk.convert(model, output="nope")(x)


def test_loss_computed_inside_forward_is_refused_unless_output_module():
    model, x, target = DictModel(), torch.randn(6, 4), torch.randint(0, 3, (6,))
    converted = dk.convert(model)
    with pytest.raises(RuntimeError, match="computed output\\['loss'\\] inside its forward"):
        converted(x, target)
    assert not converted.dfa.pending_points
    # the error taken at the body's output: the head and the loss inside forward see the DFA op
    at_body = dk.convert(model, points="body.0", output_module="body", seed=2)
    out = at_body(x, target)
    torch.testing.assert_close(out["loss"], model(x, target)["loss"])
    out["loss"].backward()
    assert at_body.model.body[0].weight.grad is not None and at_body.model.head.weight.grad is not None
    with pytest.raises(ValueError, match="output_module must name a submodule"):
        dk.convert(model, output_module="bodyy")


@pytest.mark.parametrize("named", [False, True])
def test_tuple_output_wraps_first_tensor(named):
    model, x = TupleModel(named), torch.randn(6, 4)
    converted = dk.convert(model)
    out = converted(x)
    assert type(out) is type(model(x))
    y = out.logits if named else out[0]
    torch.testing.assert_close(y, model(x).logits if named else model(x)[0])
    _loss(y, torch.zeros(6, dtype=torch.long)).backward()
    assert converted.model.body[0].weight.grad is not None
    with pytest.raises(ValueError, match="output=5 is not an index"):
        dk.convert(model, output=5)(x)


# ---------------------------------------------------------------- shared modules, eval, a CNN
class SharedTwice(nn.Module):
    """One linear + activation applied twice in one forward (weights shared)."""

    def __init__(self):
        super().__init__()
        self.inp, self.shared, self.act, self.head = nn.Linear(4, 8), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
        self.alias = self.shared  # the same module under a second name

    def forward(self, x):
        h = self.act(self.inp(x))
        h = self.act(self.shared(h))
        h = self.act(self.alias(h))
        return self.head(h)


def test_shared_module_used_twice_gets_a_point_per_call():
    model, x, target = SharedTwice(), torch.randn(5, 4), torch.randint(0, 3, (5,))
    converted = dk.convert(model, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HybridGradientWarning)  # a shared weight is not a leak
        _loss(converted(x), target).backward()
    assert converted.points == ("act",) and converted.dfa.spec.widths == (8, 8, 8)
    # by hand: the shared layer's gradient sums the feedback of its two calls
    dfa, m = dk.DFA(seed=4), copy.deepcopy(model)
    h = dfa.point(m.act(m.inp(x)))
    h = dfa.point(m.act(m.shared(h)))
    h = dfa.point(m.act(m.shared(h)))
    _loss(dfa(m.head(h)), target).backward()
    for (name, p), q in zip(converted.model.named_parameters(), m.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    # points on the shared module by name: both names are the one module
    assert dk.convert(model, points="alias").points == ("shared",)


class SmallCNN(nn.Module):
    """torchvision-style: conv + BN + ReLU + max-pool, twice, global average pool, linear head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def test_cnn_with_batchnorm_and_pooling_trains_and_matches_in_eval():
    torch.manual_seed(1)
    model, x, target = SmallCNN(), torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    converted = dk.convert(model, seed=0)
    assert converted.points == ("features.2", "features.6")
    torch.testing.assert_close(converted(x), model(x))  # train mode: batch statistics, buffers updated
    converted.eval(), model.eval()
    torch.testing.assert_close(converted(x), model(x))  # eval mode: running statistics
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x))
    assert converted.dfa.spec.widths == (8 * 16 * 16, 16 * 8 * 8)
    converted.train()
    opt = torch.optim.SGD(converted.parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = _loss(converted(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_dfa_step_in_eval_mode():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3))
    converted = dk.convert(model).eval()
    x = torch.randn(5, 4)
    torch.testing.assert_close(converted(x), model.eval()(x))
    _loss(converted(x), torch.zeros(5, dtype=torch.long)).backward()
    assert converted.model[0].weight.grad is not None


def test_deepcopy_and_pickle_keep_hooks_bound_to_the_copy():
    converted = dk.convert(_seq(), seed=2)
    x = torch.randn(3, 6)
    converted(x)
    clone = copy.deepcopy(converted)
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (clone, loaded):
        torch.testing.assert_close(other(x), converted(x))
        assert not converted.dfa.pending_points
        _loss(other(x), torch.zeros(3, dtype=torch.long)).backward()
        assert other.model[0].weight.grad is not None and converted.model[0].weight.grad is None
    assert pickle.loads(pickle.dumps(converted.dfa)).seed == 2


# ---------------------------------------------------------------- stale points
def test_points_left_by_a_failed_forward_are_discarded_with_a_warning():
    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.act, self.head = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)
            self.fail = False

        def forward(self, x):
            h = self.act(self.l1(x))
            if self.fail:
                raise ValueError("boom")
            return self.head(h)

    converted = dk.convert(Fails())
    x = torch.randn(3, 4)
    converted.model.fail = True
    with pytest.raises(ValueError, match="boom"):
        converted(x)
    assert not converted.dfa.pending_points  # the failed forward's point is dropped at once
    converted.dfa.point(torch.randn(3, 5))  # a point recorded outside any forward
    converted.model.fail = False
    with pytest.warns(RuntimeWarning, match="discarded 1 feedback point"):
        out = converted(x)
    _loss(out, torch.zeros(3, dtype=torch.long)).backward()
    assert converted.dfa.spec.widths == (8,)


def test_hand_written_model_drops_stale_points_once_widths_are_fixed():
    seq = _seq()
    model = HandMLP(seq, dk.DFA())
    x = torch.randn(4, 6)
    model(x)
    model.dfa.point(torch.randn(4, 9))  # never consumed
    with pytest.warns(RuntimeWarning, match="discarded 1 stale feedback point"):
        _loss(model(x), torch.zeros(4, dtype=torch.long)).backward()
    assert model.dfa.spec.widths == (16, 12)
    model.dfa.point(torch.randn(4, 9))
    assert model.dfa.discard_points() == 1 and not model.dfa.pending_points


# ---------------------------------------------------------------- residual models
class ResBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.fc1, self.act, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class ResNet(nn.Module):
    def __init__(self, d=8, depth=3):
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.blocks = nn.ModuleList(ResBlock(d) for _ in range(depth))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _first_step_warnings(converted, x):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            _loss(converted(x), torch.zeros(x.shape[0], dtype=torch.long)).backward()
    return [w for w in caught if issubclass(w.category, HybridGradientWarning)]


def test_points_inside_residual_branches_warn_once_naming_the_modules():
    x = torch.randn(5, 4)
    caught = _first_step_warnings(dk.convert(ResNet()), x)  # default: after every GELU, inside the branches
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "residual stream" in text and "the output" in text and "point 'blocks.1.act'" in text
    # below the stream: mixed; a branch's norm/fc1 (its own point's only) and the last fc2 (the
    # output's exact gradient only) are not
    assert "signals: embed, blocks.0.fc2, blocks.1.fc2." in text
    assert "points='blocks.*'" in text  # the macro suggestion


def test_residual_placements_that_are_faithful_do_not_warn():
    x = torch.randn(5, 4)
    macro = dk.convert(ResNet(), points="blocks.*")
    micro = dk.convert(ResNet(), points=["blocks.*", "blocks.*.act"], input_points="blocks.0")
    sequential = dk.convert(_seq())
    for converted in (macro, micro, sequential):
        assert _first_step_warnings(converted, x if converted is not sequential else torch.randn(5, 6)) == []
    assert micro.points[0] == "blocks.0 (input)" and len(micro.dfa.spec.widths) == 7
    # micro without the first block's input point: the embedding learns from three points' mixed signals
    leaky = dk.convert(ResNet(), points=["blocks.*", "blocks.*.act"])
    (warning,) = _first_step_warnings(leaky, x)
    text = str(warning.message)
    assert "embed" in text and "point 'blocks.0.act'" in text and "point 'blocks.0'" in text
    assert "the output" not in text and "blocks.1.fc1" not in text
    assert _first_step_warnings(dk.convert(ResNet(), check_residual=False), x) == []


def test_micro_placement_gradients_are_each_points_own():
    """In the faithful micro placement every parameter gets exactly one point's feedback."""
    torch.manual_seed(3)
    model, x, target = ResNet(depth=2), torch.randn(5, 4), torch.randint(0, 3, (5,))
    micro = dk.convert(model, points=["blocks.*", "blocks.*.act"], input_points="blocks.0", seed=7)
    _loss(micro(x), target).backward()
    assert micro.points == ("blocks.0 (input)", "blocks.0", "blocks.0.act", "blocks.1", "blocks.1.act")
    # by hand, in call order: embed's point, block 0 (act, block), block 1 (act, block)
    dfa, m = dk.DFA(seed=7), copy.deepcopy(model)
    h = dfa.point(m.embed(x))
    for b in m.blocks:
        h = dfa.point(h + b.fc2(dfa.point(b.act(b.fc1(b.norm(h))))))
    _loss(dfa(m.head(h)), target).backward()
    for (name, p), q in zip(micro.model.named_parameters(), m.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_detach_cuts_the_stream_without_a_point():
    x = torch.randn(5, 4)
    converted = dk.convert(ResNet(), points="blocks.*.act", detach="blocks.*", input_points="blocks.0")
    # blocks 1 and 2 read a detached stream; block 0's input is a point: nothing leaks,
    # but nothing learns the residual branch outputs (fc2) except by the output's exact gradient
    caught = _first_step_warnings(converted, x)
    assert caught == []
    assert converted.model.blocks[0].fc2.weight.grad is None  # cut below block 1: no signal reaches it
