"""Graph neural networks trained with Direct Feedback Alignment (DFA), built from PyG layers.

Every model takes a ``dk.DFA`` module (``mode="dfa" | "bp" | "shallow"``) and marks

* feedback points, ``h = self.dfa.point(h)``, after hidden activations, and
* the output, ``y = self.dfa(y)``, before ``log_softmax`` (node classification) or on the node
  embedding (the graph autoencoder).

Node-level tensors are ``[num_nodes, features]``: the error ``dL/dy`` is ``[num_nodes, classes]``
and every node's hidden features receive ``e_node @ B`` through one feedback matrix shared by all
nodes. With the loss on the training mask only, the error (hence the feedback) is zero elsewhere.

Layers follow PyG's Cora examples (GCN, GAT, ChebConv, SplineConv, DNAConv, GAE). ``SplineConv``
here is a pure-PyTorch version of PyG's layer (PyG's needs the compiled ``pyg-lib``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import GAE, ChebConv, DNAConv, GATConv, GCNConv, MessagePassing
from torch_geometric.nn.dense.linear import Linear
from torch_geometric.nn.inits import uniform

import dfa_kernels as dk


def _dfa(dfa):
    return dfa if dfa is not None else dk.DFA(mode="dfa")


def feature_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout`` for mostly-zero inputs (bag-of-words): the same result in distribution,
    but random numbers are drawn only for the non-zeros (dropping a zero changes nothing). On a
    CPU this makes Cora's input dropout ~20x cheaper than ``F.dropout`` on the dense matrix."""
    if not training or p == 0.0:
        return x
    rows, cols = x.detach().nonzero(as_tuple=True)
    keep = torch.rand(rows.numel(), device=x.device) >= p
    mask = torch.zeros_like(x)
    mask[rows[keep], cols[keep]] = 1.0 / (1.0 - p)
    return x * mask


# --------------------------------------------------------------------------------------------
# SplineConv in plain PyTorch (open B-splines of degree 1, the setting of the SplineCNN paper's
# and the DFA paper's citation experiments).
# --------------------------------------------------------------------------------------------
def spline_basis(
    pseudo: torch.Tensor, kernel_size: torch.Tensor, is_open_spline: torch.Tensor, degree: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Degree-1 B-spline basis of pseudo-coordinates ``pseudo`` in ``[0, 1]^dim``.

    Each coordinate ``u_d`` is scaled to ``v_d = u_d * (k_d - open_d)`` (``k_d`` knots; an open
    spline spans ``k_d - 1`` intervals, a closed one wraps around). An edge then touches the
    ``2^dim`` corners ``c`` of its cell: kernel index ``sum_d ((floor(v_d) + c_d) mod k_d) *
    prod_{d'<d} k_d'`` with weight ``prod_d (frac(v_d) if c_d else 1 - frac(v_d))``.
    Same as ``torch_spline_conv.spline_basis``. Returns ``(basis, weight_index)``, both
    ``[E, 2^dim]``.
    """
    if degree != 1:
        raise NotImplementedError("only degree-1 (linear) B-splines are implemented")
    pseudo = pseudo.view(-1, 1) if pseudo.dim() == 1 else pseudo
    dim = pseudo.size(1)
    v = pseudo * (kernel_size - is_open_spline).to(pseudo.dtype)  # [E, dim]
    lo, frac = v.floor(), v - v.floor()
    corner = (
        torch.arange(2**dim, device=pseudo.device)[:, None] >> torch.arange(dim, device=pseudo.device)
    ) & 1  # [S, dim]
    idx = (lo.long()[:, None, :] + corner) % kernel_size  # [E, S, dim]
    stride = torch.cumprod(torch.cat([kernel_size.new_ones(1), kernel_size[:-1]]), 0)
    weight_index = (idx * stride).sum(-1)
    basis = torch.where(corner.bool(), frac[:, None, :], 1 - frac[:, None, :]).prod(-1)
    return basis, weight_index


class SplineConv(MessagePassing):
    r"""PyG's ``SplineConv`` (same arguments, parameters and initialisation), pure PyTorch.

    .. math:: x'_i = \frac{1}{|N(i)|} \sum_{j \in N(i)} x_j \cdot h_\Theta(e_{ij}) + x_i W_{root} + b

    with the kernel ``h_Theta(u) = sum_k basis_k(u) Theta_k`` over ``prod(kernel_size)`` weight
    matrices. ``edge_attr`` holds pseudo-coordinates in ``[0, 1]^dim``, e.g. from
    ``T.Cartesian()`` (graphs with positions) or ``T.TargetIndegree()`` (citation graphs).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dim: int,
        kernel_size,
        is_open_spline: bool = True,
        degree: int = 1,
        aggr: str = "mean",
        root_weight: bool = True,
        bias: bool = True,
        **kwargs,
    ):
        super().__init__(aggr=aggr, node_dim=0, **kwargs)  # messages are [E, out]
        if degree != 1:
            raise NotImplementedError("only degree-1 B-splines are implemented")
        self.in_channels, self.out_channels, self.dim, self.degree = in_channels, out_channels, dim, degree
        ks = [kernel_size] * dim if isinstance(kernel_size, int) else list(kernel_size)
        self.register_buffer("kernel_size", torch.tensor(ks, dtype=torch.long))
        self.register_buffer("is_open_spline", torch.tensor([int(is_open_spline)] * dim))
        self.weight = nn.Parameter(torch.empty(int(self.kernel_size.prod()), in_channels, out_channels))
        self.lin = Linear(in_channels, out_channels, bias=False, weight_initializer="uniform") if root_weight else None
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        super().reset_parameters()
        uniform(self.weight.size(0) * self.weight.size(1), self.weight)
        if self.lin is not None:
            self.lin.reset_parameters()
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        # x_j @ sum_s b_s Theta_{k_s} == sum_s b_s (x_j @ Theta_{k_s}): transform each node once
        # by every kernel matrix ([N, K, out]), then mix per edge (cheap when K is small).
        xw = torch.einsum("ni,kio->nko", x, self.weight)
        out = self.propagate(edge_index, xw=xw, edge_attr=edge_attr, size=(x.size(0), x.size(0)))
        if self.lin is not None:
            out = out + self.lin(x)
        return out if self.bias is None else out + self.bias

    def message(self, xw_j: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        basis, index = spline_basis(edge_attr, self.kernel_size, self.is_open_spline, self.degree)
        picked = xw_j.gather(1, index[..., None].expand(-1, -1, xw_j.size(-1)))  # [E, S, out]
        return (basis[..., None] * picked).sum(1)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, dim={self.dim})"


# --------------------------------------------------------------------------------------------
# Node classification: two graph convolutions, one feedback point in between.
# --------------------------------------------------------------------------------------------
class TwoLayerGNN(nn.Module):
    """``dropout -> conv1 -> act -> dropout -> point -> conv2 -> DFA output -> log_softmax``."""

    act = staticmethod(F.relu)

    def __init__(self, conv1: nn.Module, conv2: nn.Module, dropout: float, dfa=None):
        super().__init__()
        self.conv1, self.conv2, self.dropout, self.dfa = conv1, conv2, dropout, _dfa(dfa)

    def forward(self, x, edge_index, edge_attr=None):
        graph = (edge_index,) if edge_attr is None else (edge_index, edge_attr)
        x = feature_dropout(x, self.dropout, self.training)
        h = F.dropout(self.act(self.conv1(x, *graph)), self.dropout, self.training)
        h = self.dfa.point(h)  # feedback reaches conv1 through the dropout mask, like a gradient
        return F.log_softmax(self.dfa(self.conv2(h, *graph)), dim=-1)


class GCN(TwoLayerGNN):
    def __init__(self, in_channels, out_channels, hidden=16, dropout=0.5, dfa=None):
        super().__init__(
            GCNConv(in_channels, hidden, cached=True), GCNConv(hidden, out_channels, cached=True), dropout, dfa
        )


class GAT(TwoLayerGNN):
    act = staticmethod(F.elu)

    def __init__(self, in_channels, out_channels, hidden=8, heads=8, dropout=0.6, dfa=None):
        super().__init__(
            GATConv(in_channels, hidden, heads=heads, dropout=dropout),
            GATConv(hidden * heads, out_channels, heads=1, concat=False, dropout=dropout),
            dropout,
            dfa,
        )


class Cheb(TwoLayerGNN):
    def __init__(self, in_channels, out_channels, hidden=16, K=2, dropout=0.5, dfa=None):
        super().__init__(ChebConv(in_channels, hidden, K=K), ChebConv(hidden, out_channels, K=K), dropout, dfa)


class Spline(TwoLayerGNN):
    """Needs ``edge_attr`` pseudo-coordinates: ``T.TargetIndegree()`` for citation graphs."""

    act = staticmethod(F.elu)

    def __init__(self, in_channels, out_channels, hidden=16, dim=1, kernel_size=2, dropout=0.5, dfa=None):
        super().__init__(
            SplineConv(in_channels, hidden, dim=dim, kernel_size=kernel_size),
            SplineConv(hidden, out_channels, dim=dim, kernel_size=kernel_size),
            dropout,
            dfa,
        )


class DNA(nn.Module):
    """``lin -> 5 x DNAConv`` (dynamic neighbourhood aggregation over all earlier layers).

    A point after ``lin`` and after every conv. In DFA mode points return detached tensors, so the
    jumping-knowledge stack each conv attends over carries no gradient to earlier layers: every
    layer learns only from its own feedback signal. ``error_at``: the DFA output wraps the logits
    ("logits") or, as in the DFA paper's code, the log-softmax ("log_softmax": the error is then
    dL/dlog p = -onehot / N on the training nodes, whatever the prediction).
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        hidden=128,
        num_layers=5,
        heads=8,
        groups=16,
        dropout=0.5,
        att_dropout=0.8,
        dfa=None,
        error_at: str = "logits",
    ):
        super().__init__()
        if error_at not in ("logits", "log_softmax"):
            raise ValueError(f"error_at must be 'logits' or 'log_softmax'; got {error_at!r}")
        self.dropout, self.dfa, self.error_at = dropout, _dfa(dfa), error_at
        self.lin1 = nn.Linear(in_channels, hidden)
        self.convs = nn.ModuleList(
            DNAConv(hidden, heads, groups, dropout=att_dropout, cached=True) for _ in range(num_layers)
        )
        self.lin2 = nn.Linear(hidden, out_channels)

    def forward(self, x, edge_index, edge_attr=None):
        h = self.dfa.point(F.dropout(F.relu(self.lin1(x)), self.dropout, self.training))
        stack = h.unsqueeze(1)  # [N, layers so far, hidden]
        for conv in self.convs:
            h = self.dfa.point(F.relu(conv(stack, edge_index)))
            stack = torch.cat([stack, h.unsqueeze(1)], dim=1)
        h = F.dropout(h, self.dropout, self.training)
        if self.error_at == "log_softmax":
            return self.dfa(F.log_softmax(self.lin2(h), dim=-1))
        return F.log_softmax(self.dfa(self.lin2(h)), dim=-1)


# --------------------------------------------------------------------------------------------
# Link prediction: a graph autoencoder, DFA on the node embedding.
# --------------------------------------------------------------------------------------------
class GCNEncoder(nn.Module):
    """``GCN(2*out) -> relu -> point -> GCN(out) -> DFA output``: the error is ``dL/dz``."""

    def __init__(self, in_channels, out_channels=16, dfa=None):
        super().__init__()
        self.conv1 = GCNConv(in_channels, 2 * out_channels, cached=True)
        self.conv2 = GCNConv(2 * out_channels, out_channels, cached=True)
        self.dfa = _dfa(dfa)

    def forward(self, x, edge_index):
        h = self.dfa.point(F.relu(self.conv1(x, edge_index)))
        return self.dfa(self.conv2(h, edge_index))


def graph_autoencoder(in_channels, out_channels=16, dfa=None) -> GAE:
    """PyG's ``GAE`` (inner-product decoder, ``recon_loss``, ``test`` -> AUC, AP) on a DFA encoder."""
    return GAE(GCNEncoder(in_channels, out_channels, dfa))
