"""The layer-wise methods (fa, usf, brsf, frsf) against a plain-PyTorch oracle given the same matrices.

The oracle transcribes biotorch's rule (jsalbert/biotorch, biotorch/autograd/fa/{linear,conv}.py):
grad(x) = g @ B for a linear layer, ``torch.nn.grad.conv2d_input`` with B for a convolution,
grad(W) = g^T x (``conv2d_weight``), grad(b) = sum(g). The oracle network is the converted model's
computation written with those functions, each layer handed ``layer.feedback_matrix()``; the
matrices themselves are checked against biotorch's formulas separately (Xavier-uniform bound, σ).
tests/test_methods_biotorch.py checks against biotorch itself where it is installed.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfa_kernels as dk
from dfa_kernels import layerwise

pytestmark = pytest.mark.usefixtures("one_thread")
MODES = ["fa", "usf", "brsf", "frsf"]
BACKENDS = [b for b in dk.available_backends("cpu") if b in ("cpu", "torch")]


# ---------------------------------------------------------------- the oracle (biotorch's rule)
class OracleLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, b, B):
        ctx.save_for_backward(x, B)
        return F.linear(x, W, b)

    @staticmethod
    def backward(ctx, g):
        x, B = ctx.saved_tensors
        g2, x2 = g.reshape(-1, g.shape[-1]).float(), x.reshape(-1, x.shape[-1]).float()
        return (g2 @ B).reshape(x.shape), g2.T @ x2, g2.sum(0) if ctx.needs_input_grad[2] else None, None


class OracleConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, b, B, stride, padding, dilation, groups):
        ctx.save_for_backward(x, B)
        ctx.args, ctx.has_bias = (stride, padding, dilation, groups), b is not None
        return F.conv2d(x, W, b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        x, B = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.args
        g, x = g.float(), x.float()
        grad_x = torch.nn.grad.conv2d_input(x.shape, B, g, stride, padding, dilation, groups)
        grad_w = torch.nn.grad.conv2d_weight(x, B.shape, g, stride, padding, dilation, groups)
        return grad_x, grad_w, g.sum((0, 2, 3)) if ctx.has_bias else None, None, None, None, None, None


def oracle_call(layer, x, params=None):
    """`layer` (a converted FeedbackLinear/FeedbackConv2d) as the oracle computes it, in fp32, with
    its matrix and the weight and bias of `params` (the original layer: same values)."""
    B = layer.feedback_matrix()
    params = params or layer
    W, b = params.weight.float(), None if params.bias is None else params.bias.float()
    if isinstance(layer, nn.Linear):
        return OracleLinear.apply(x, W, b, B)
    return OracleConv.apply(x, W, b, B, layer.stride, layer.padding, layer.dilation, layer.groups)


def compare(converted, model, x, make_loss, atol=1e-5, rtol=1e-4, oracle_forward=None):
    """Gradients of the converted model (one training step) against the oracle's, given the same
    matrices: the original model's forward with each layer call replaced by the oracle's, for its
    converted twin (same name)."""
    converted.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_()
    make_loss(converted(xg)).backward()
    named = dict(converted.model.named_modules())
    twin = {id(m): named[n] for n, m in model.named_modules()}
    assert any(isinstance(m, layerwise.FeedbackLayer) for m in twin.values()), "nothing converted"
    x32 = x.float().requires_grad_()
    if oracle_forward is None:
        out = model.forward(x32, lambda layer, h: oracle_call(twin[id(layer)], h.float(), layer))
    else:
        out = oracle_forward(x32, twin)
    # the converted model is a copy: its parameters, in the same order, have the original's values
    expected = torch.autograd.grad(make_loss(out), [x32] + list(model.parameters()))
    got = [xg.grad] + [p.grad for p in converted.model.parameters()]
    assert len(got) == len(expected)
    for g, want in zip(got, expected):
        torch.testing.assert_close(g.float(), want.float(), atol=atol, rtol=rtol)


def loss_fn(target):
    return lambda y: F.cross_entropy(y.reshape(-1, y.shape[-1]).float(), target.reshape(-1))


# ---------------------------------------------------------------- networks (forward with a pluggable layer call)
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(6, 16), nn.Linear(16, 12), nn.Linear(12, 5)

    def forward(self, x, call=None):
        call = call or (lambda layer, h: layer(h))
        return call(self.l3, torch.tanh(call(self.l2, torch.relu(call(self.l1, x)))))


class CNN(nn.Module):
    """Stride, padding, dilation and groups, a bias-free layer, then a linear head."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=3, bias=False)
        self.c3 = nn.Conv2d(6, 4, (1, 3), stride=(1, 2), padding=(0, 1))
        self.head = nn.Linear(4 * 4 * 2, 5)

    def forward(self, x, call=None):
        call = call or (lambda layer, h: layer(h))
        h = torch.relu(call(self.c1, x))
        h = torch.relu(call(self.c2, h))
        h = torch.relu(call(self.c3, h))
        return call(self.head, h.flatten(1))


class Residual(nn.Module):
    """Two converted layers read one tensor: its gradient is the sum of their g @ B."""

    def __init__(self):
        super().__init__()
        self.inp, self.a, self.b, self.out = nn.Linear(6, 10), nn.Linear(10, 10), nn.Linear(10, 10), nn.Linear(10, 5)

    def forward(self, x, call=None):
        call = call or (lambda layer, h: layer(h))
        h = torch.relu(call(self.inp, x))
        h = h + torch.tanh(call(self.a, h)) + call(self.b, h)
        return call(self.out, h)


class Block(nn.Module):
    """A pre-norm Transformer block's linears (q, k, v, o, the MLP) on [B, T, d], and a head."""

    def __init__(self, d=8, heads=2, vocab=7):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down, self.head = nn.Linear(d, 4 * d), nn.Linear(4 * d, d), nn.Linear(d, vocab)

    def forward(self, x, call=None):
        call = call or (lambda layer, h: layer(h))
        B, T, d = x.shape
        h = self.norm1(x)
        q, k, v = (call(m, h).reshape(B, T, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d)
        x = x + call(self.o, att)
        x = x + call(self.down, F.gelu(call(self.up, self.norm2(x))))
        return call(self.head, x)


# ---------------------------------------------------------------- gradients against the oracle
@pytest.mark.parametrize("storage", ["virtual", "materialized"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_mlp_equals_the_oracle(mode, backend, storage):
    torch.manual_seed(0)
    model = MLP()
    converted = dk.convert(model, mode=mode, backend=backend, storage=storage)
    x, target = torch.randn(9, 6), torch.randint(0, 5, (9,))
    compare(converted, model, x, loss_fn(target))


def _run(model_cls, mode, x, target, atol=1e-5, rtol=1e-4):
    torch.manual_seed(1)
    model = model_cls()
    compare(dk.convert(model, mode=mode), model, x, loss_fn(target), atol, rtol)


@pytest.mark.parametrize("mode", MODES)
def test_cnn_with_stride_padding_dilation_groups_equals_the_oracle(mode):
    _run(CNN, mode, torch.randn(3, 4, 8, 8), torch.randint(0, 5, (3,)))


@pytest.mark.parametrize("mode", MODES)
def test_residual_block_sums_the_signals_of_two_layers(mode):
    _run(Residual, mode, torch.randn(7, 6), torch.randint(0, 5, (7,)))


@pytest.mark.parametrize("mode", MODES)
def test_transformer_linears_equal_the_oracle(mode):
    _run(Block, mode, torch.randn(2, 5, 8), torch.randint(0, 7, (2, 5)), atol=2e-5)


@pytest.mark.parametrize("mode", ["fa", "usf"])
def test_bf16_equals_the_fp32_oracle_to_bf16_precision(mode):
    torch.manual_seed(2)
    model = MLP().to(torch.bfloat16)
    converted = dk.convert(model, mode=mode)
    x, target = torch.randn(16, 6, dtype=torch.bfloat16), torch.randint(0, 5, (16,))
    compare(converted, model, x, loss_fn(target), atol=3e-2, rtol=3e-2)


class Graph(nn.Module):
    """GCNConv then ChebConv (K=2) on a small undirected graph: PyG's own Linear layers get the
    feedback matrices, message passing keeps its exact transpose. The oracle path writes both
    convolutions with dense normalized adjacencies around the layer calls."""

    def __init__(self):
        super().__init__()
        from torch_geometric.nn import ChebConv, GCNConv

        self.c1, self.c2 = GCNConv(6, 10), ChebConv(10, 5, K=2)
        src = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 2])
        dst = torch.tensor([1, 2, 3, 4, 5, 6, 0, 3, 5])
        self.register_buffer("edges", torch.stack([torch.cat([src, dst]), torch.cat([dst, src])]))

    def forward(self, x, call=None):
        if call is None:
            return self.c2(torch.relu(self.c1(x, self.edges)), self.edges)
        A = torch.zeros(x.shape[0], x.shape[0])
        A[self.edges[1], self.edges[0]] = 1.0
        A_hat = A + torch.eye(len(A))  # GCN: D^-1/2 (A + I) D^-1/2
        d = A_hat.sum(1).rsqrt()
        gcn = d[:, None] * A_hat * d[None, :]
        d = A.sum(1).rsqrt()  # Cheb (sym, lambda_max 2): L_hat = -D^-1/2 A D^-1/2
        cheb = -(d[:, None] * A * d[None, :])
        h = torch.relu(gcn @ call(self.c1.lin, x) + self.c1.bias)
        return call(self.c2.lins[0], h) + call(self.c2.lins[1], cheb @ h) + self.c2.bias


@pytest.mark.parametrize("mode", MODES)
def test_pyg_linear_layers_equal_the_oracle(mode):
    pytest.importorskip("torch_geometric")
    torch.manual_seed(3)
    model = Graph()
    converted = dk.convert(model, mode=mode)
    assert converted.layers == ("c1.lin", "c2.lins.0", "c2.lins.1")
    compare(converted, model, torch.randn(7, 6), loss_fn(torch.randint(0, 5, (7,))))


def test_conv_padding_same_and_reflect_pad_before_the_function():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 3, 4, padding="same")  # even kernel: uneven sides
            self.b = nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")
            self.head = nn.Linear(3 * 6 * 6, 5)

        def forward(self, x, call=None):
            call = call or (lambda layer, h: layer(h))
            h = torch.relu(call(self.a, x))
            h = torch.relu(call(self.b, h))
            return call(self.head, h.flatten(1))

    def oracle_forward(x, twin):
        a, b, head = twin[id(model.a)], twin[id(model.b)], twin[id(model.head)]
        h = torch.relu(
            OracleConv.apply(
                F.pad(x, a._reversed_padding_repeated_twice),
                model.a.weight,
                model.a.bias,
                a.feedback_matrix(),
                a.stride,
                0,
                a.dilation,
                a.groups,
            )
        )
        h = torch.relu(
            OracleConv.apply(
                F.pad(h, b._reversed_padding_repeated_twice, mode="reflect"),
                model.b.weight,
                model.b.bias,
                b.feedback_matrix(),
                b.stride,
                0,
                b.dilation,
                b.groups,
            )
        )
        return oracle_call(head, h.flatten(1), model.head)

    torch.manual_seed(3)
    model = Net()
    converted = dk.convert(model, mode="fa")
    x, target = torch.randn(2, 2, 6, 6), torch.randint(0, 5, (2,))
    torch.testing.assert_close(converted(x), model(x))
    compare(converted, model, x, loss_fn(target), oracle_forward=oracle_forward)


@pytest.mark.skipif("triton" not in dk.available_backends("cpu"), reason="Triton is not installed")
def test_fa_on_the_triton_backend():
    torch.manual_seed(4)
    model = MLP()
    converted = dk.convert(model, mode="fa", backend="triton", storage="virtual")
    x, target = torch.randn(9, 6), torch.randint(0, 5, (9,))
    compare(converted, model, x, loss_fn(target))


class Shared(nn.Module):
    """One layer called twice in a forward: both backward calls build B in the layer's one buffer."""

    def __init__(self):
        super().__init__()
        self.inp, self.shared, self.out = nn.Linear(6, 10), nn.Linear(10, 10), nn.Linear(10, 5)

    def forward(self, x, call=None):
        call = call or (lambda layer, h: layer(h))
        h = torch.relu(call(self.inp, x))
        h = torch.tanh(call(self.shared, torch.tanh(call(self.shared, h))))
        return call(self.out, h)


@pytest.mark.parametrize("mode", ["fa", "usf", "frsf"])  # brsf draws anew at each call
def test_a_layer_called_twice_equals_the_oracle(mode):
    _run(Shared, mode, torch.randn(7, 6), torch.randint(0, 5, (7,)))


def test_sign_concordant_layers_build_b_in_one_kept_buffer():
    """usf/brsf/frsf build B in a W-sized buffer the layer keeps (CPU, storage not virtual): the same
    buffer every step; none under storage="virtual"."""
    torch.manual_seed(7)
    x = torch.randn(4, 6)
    for mode in ("usf", "brsf", "frsf"):
        kept, virtual = dk.convert(MLP(), mode=mode), dk.convert(MLP(), mode=mode, storage="virtual")
        kept(x).sum().backward()
        virtual(x).sum().backward()
        buffer = kept.model.l2.__dict__["_b_workspace"]
        kept(x).sum().backward()
        assert kept.model.l2.__dict__["_b_workspace"] is buffer and buffer.shape == kept.model.l2.weight.shape
        assert "_b_workspace" not in virtual.model.l2.__dict__


# ---------------------------------------------------------------- the matrices
def _hash(layer, seed):
    W = layer.weight
    return dk.FeedbackSpec(W.shape[0], (W[0].numel(),), seed).matrix().view(W.shape)


@pytest.mark.parametrize("init", ["xavier", "kaiming"])
def test_matrices_are_biotorchs_formulas(init):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 8))
    conv_model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.ReLU())
    for net in (model, conv_model):
        converted = dk.convert(net, mode="fa", init=init, seed=11)
        for layer in (m for m in converted.model.modules() if isinstance(m, layerwise.FeedbackLayer)):
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(layer.weight)
            # biotorch: scaling_factor = sqrt(2 / (fan_in + fan_out)) (Xavier), 1 / sqrt(3 fan_in) (kaiming)
            sigma = math.sqrt(2.0 / (fan_in + fan_out)) if init == "xavier" else 1 / math.sqrt(3 * fan_in)
            bound = (
                math.sqrt(3) * sigma
            )  # xavier_uniform_'s bound sqrt(6 / (fan_in + fan_out)); kaiming's 1/sqrt(fan_in)
            H = _hash(layer, layer.seed)
            sign = torch.sign(layer.weight.detach())
            converted.dfa.mode = "fa"
            torch.testing.assert_close(layer.feedback_matrix(), bound * H)
            assert layer.feedback_matrix().abs().max() <= bound
            converted.dfa.mode = "usf"
            torch.testing.assert_close(layer.feedback_matrix(), sigma * sign)
            converted.dfa.mode = "frsf"
            torch.testing.assert_close(layer.feedback_matrix(), bound * H.abs() * sign)


def test_fixed_matrices_are_kept_once_per_layer_and_never_saved():
    """fa's and frsf's fixed part is generated once and kept by the layer (not under "virtual"),
    outside the state_dict; a mode switch replaces it; usf and brsf keep nothing."""
    torch.manual_seed(6)
    model = MLP()
    kept = dk.convert(model, mode="fa", storage="auto")
    virtual = dk.convert(model, mode="fa", storage="virtual")
    x = torch.randn(4, 6)
    for converted in (kept, virtual):
        converted(x).sum().backward()
    layer = kept.model.l2
    stored = layer.__dict__["_stored"][1]
    kept(x).sum().backward()
    assert layer.__dict__["_stored"][1] is stored  # the same tensor: not regenerated
    torch.testing.assert_close(stored, layer.feedback_matrix())
    assert "_stored" not in virtual.model.l2.__dict__
    assert set(kept.state_dict()) == set(virtual.state_dict())  # nothing more than the virtual model's
    kept.dfa.mode = "frsf"
    kept(x).sum().backward()
    torch.testing.assert_close(layer.__dict__["_stored"][1], stored.abs())
    for mode in ("usf", "brsf"):
        fresh = dk.convert(MLP(), mode=mode)
        fresh(x).sum().backward()
        assert "_stored" not in fresh.model.l2.__dict__


def test_each_layer_its_own_matrix_and_brsf_redraws_every_step():
    torch.manual_seed(6)
    converted = dk.convert(MLP(), mode="brsf")
    layers = [converted.model.l1, converted.model.l2, converted.model.l3]
    assert len({layer.seed for layer in layers}) == 3
    x = torch.randn(4, 6)
    draws = []
    for _ in range(3):
        converted(x).sum().backward()
        B = layers[1].feedback_matrix()
        sign = torch.sign(layers[1].weight.detach())
        assert torch.equal(torch.sign(B), sign)  # sign-concordant
        draws.append(B.abs())
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    with torch.no_grad():  # evaluation draws nothing
        converted(x)
    assert layers[1].draws == 3
    converted.dfa.mode = "frsf"
    fixed = [layers[1].feedback_matrix()]
    converted(x).sum().backward()
    assert torch.equal(layers[1].feedback_matrix(), fixed[0])


@pytest.mark.parametrize("mode", MODES)
def test_input_gradient_is_not_backprop(mode):
    """A backward that were backprop in disguise (g @ W) fails here; the weight gradient is backprop's."""
    torch.manual_seed(7)
    layer = dk.FeedbackLinear(10, 6, mode=mode)
    x = torch.randn(5, 10, requires_grad=True)
    g = torch.randn(5, 6)
    layer(x).backward(g)
    torch.testing.assert_close(x.grad, g @ layer.feedback_matrix())
    assert not torch.allclose(x.grad, g @ layer.weight.detach(), atol=1e-3)
    torch.testing.assert_close(layer.weight.grad, g.T @ x.detach())
    torch.testing.assert_close(layer.bias.grad, g.sum(0))


# ---------------------------------------------------------------- modes, conversion, options
def test_one_converted_model_switches_between_every_method():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 5))
    converted = dk.convert(model, mode="fa", threshold=0.5)  # points at the activations too, for direct modes
    assert converted.layers == ("0", "2", "4") and converted.points == ("1", "3")
    x, target = torch.randn(6, 6), torch.randint(0, 5, (6,))

    def grads():
        converted.zero_grad(set_to_none=True)
        converted.dfa.targets(target)
        F.cross_entropy(converted(x), target).backward()
        return converted.model[0].weight.grad.clone()

    converted.dfa.mode = "bp"
    exact = grads()
    model.zero_grad()
    F.cross_entropy(model(x), target).backward()
    torch.testing.assert_close(exact, model[0].weight.grad)  # plain layers in mode bp
    seen = {"bp": exact}
    for mode in ["fa", "usf", "frsf", "dfa", "sdfa", "drtp", "ternary"]:
        converted.dfa.mode = mode
        g = grads()
        assert all(not torch.allclose(g, other) for other in seen.values()), mode
        seen[mode] = g
    converted.dfa.mode = "dkp"  # its learned matrix starts as dfa's
    torch.testing.assert_close(grads(), seen["dfa"])


def test_conversion_keeps_names_outputs_and_shares_parameters():
    torch.manual_seed(9)
    model = CNN()
    converted = dk.convert(model, mode="usf")
    assert converted.layers == ("c1", "c2", "c3", "head")
    assert list(converted.model.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(converted(x), model(x))
    weight = model.c1.weight
    inplace = dk.convert(model, mode="fa", inplace=True)
    assert isinstance(model.c1, layerwise.FeedbackConv2d) and inplace.model.c1.weight is weight
    with pytest.raises(AttributeError, match="converted.dfa.mode"):
        inplace.model.c1.mode = "usf"


def test_layers_argument_and_direct_mode_without_layers():
    torch.manual_seed(10)
    converted = dk.convert(MLP(), mode="fa", layers="l2")
    assert converted.layers == ("l2",)
    assert type(converted.model.l1) is nn.Linear and isinstance(converted.model.l2, dk.FeedbackLinear)
    direct = dk.convert(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)), mode="dfa")
    assert direct.layers == ()
    direct.dfa.mode = "fa"
    with pytest.raises(RuntimeError, match=r"mode 'fa' .*converted without layer-wise layers.*layers="):
        direct(torch.randn(2, 6))
    with pytest.raises(TypeError, match="layer-wise feedback applies to nn.Linear, nn.Conv2d and PyG's Linear"):
        dk.convert(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), mode="fa", layers=nn.ReLU)
    with pytest.raises(ValueError, match="fuse=True"):
        dk.convert(MLP(), mode="fa", fuse=True)
    with pytest.raises(ValueError, match="init must be one of"):
        dk.convert(MLP(), mode="fa", init="he")


def test_constrain_weights_keeps_the_initial_norm():
    torch.manual_seed(11)
    converted = dk.convert(MLP(), mode="fa", constrain_weights=True)
    layer = converted.model.l2
    norm0 = torch.linalg.vector_norm(layer.weight.detach()).item()
    opt = torch.optim.SGD(converted.parameters(), lr=1.0)
    x = torch.randn(8, 6)
    for _ in range(3):
        opt.zero_grad()
        converted(x).square().sum().backward()
        opt.step()
        assert abs(torch.linalg.vector_norm(layer.weight.detach()).item() - norm0) > 1e-3
        converted(x)  # the forward rescales W to its initial norm
        assert abs(torch.linalg.vector_norm(layer.weight.detach()).item() - norm0) < 1e-4 * norm0
    assert "initial_norm" not in converted.model.state_dict()


def test_standalone_layers():
    torch.manual_seed(12)
    conv = dk.FeedbackConv2d(3, 4, 3, padding=1, mode="frsf", seed=5)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    g = torch.randn(2, 4, 5, 5)
    conv(x).backward(g)
    torch.testing.assert_close(x.grad, torch.nn.grad.conv2d_input(x.shape, conv.feedback_matrix(), g, padding=1))
    conv.mode = "bp"
    x.grad = None
    conv(x).backward(g)
    torch.testing.assert_close(x.grad, torch.nn.grad.conv2d_input(x.shape, conv.weight.detach(), g, padding=1))
    with pytest.raises(RuntimeError, match="uses no layer-wise feedback matrix"):
        conv.feedback_matrix()
    with pytest.raises(ValueError, match="mode must be one of 'fa', 'usf', 'brsf', 'frsf', 'bp'"):
        dk.FeedbackLinear(3, 4, mode="dfa")
