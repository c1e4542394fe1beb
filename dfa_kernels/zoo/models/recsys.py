"""Click-through-rate models trained with Direct Feedback Alignment: FM, DeepFM, DCN, AutoInt, AFN.

Every model maps a batch ``(idx [B, F1] long, bag [B, G] float)`` (one-valued and multi-hot
fields, see :class:`dfa_kernels.data.criteo.CTRData`) to one logit ``[B, 1]``, and puts the DFA
output on that logit: the error is 1 wide, so the projection is an outer product (the
memory-bound end of the kernels). ``h = self.dfa.point(h)`` marks a feedback point; in
``mode="dfa"`` the layers before a point learn from its random projection of the error, layers
after the last point (on every path to the logit) learn exactly, and in ``mode="shallow"`` only
those learn. ``mode="bp"`` is ordinary backpropagation through the same model.

What learns exactly (= what learns in shallow mode), per model:
  FM       everything: no hidden layer, so no DFA (DFA = BP = shallow); the BP baseline
  DeepFM   the FM part (embeddings, linear term) and the MLP's output layer
  DCN      the output layer only (points on the embeddings, the cross layers, the MLP, the stack)
  AutoInt  the output layer only (points on the embeddings and each attention layer)
  AFN      the output layer only (points after the logarithmic layer and each MLP block)
"""

from __future__ import annotations

import torch
from torch import nn

import dfa_kernels as dk


class FieldEmbedding(nn.Module):
    """``(idx [B, F1], bag [B, G])`` -> one ``dim``-vector per field, ``[B, F, dim]``. A multi-hot
    field ``(first_row, n)`` of ``bags`` embeds as the sum of its values' embeddings weighted by its
    ``n`` columns of ``bag`` (see ``dfa_kernels.data.criteo``)."""

    def __init__(self, vocab_size: int, num_fields: int, dim: int, bags=()):
        super().__init__()
        self.num_fields, self.bags = num_fields, [tuple(b) for b in bags]
        self.emb = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.emb.weight, std=0.01)

    def forward(self, idx, bag):
        fields, col = [self.emb(idx)], 0  # [B, F1, dim]
        for row, n in self.bags:
            fields.append((bag[:, col : col + n] @ self.emb.weight[row : row + n]).unsqueeze(1))
            col += n
        return torch.cat(fields, 1)


def fm_interaction(e):
    """Factorization machine's pairwise term sum_{i<j} <e_i, e_j>, for e ``[B, F, d]`` -> ``[B, 1]``."""
    return 0.5 * (e.sum(1).pow(2) - e.pow(2).sum(1)).sum(1, keepdim=True)


def mlp(d_in: int, hidden, dropout: float = 0.0) -> nn.ModuleList:
    """Blocks Linear -> BatchNorm -> ReLU (-> Dropout); the caller puts a point after each."""
    blocks = []
    for d in hidden:
        blocks.append(nn.Sequential(nn.Linear(d_in, d), nn.BatchNorm1d(d), nn.ReLU(), nn.Dropout(dropout)))
        d_in = d
    return nn.ModuleList(blocks)


class FM(nn.Module):
    """Factorization machine (BP baseline): bias + linear + pairwise interactions."""

    def __init__(self, vocab_size, num_fields, bags=(), embed_dim=16):
        super().__init__()
        self.embed = FieldEmbedding(vocab_size, num_fields, embed_dim, bags)
        self.linear = FieldEmbedding(vocab_size, num_fields, 1, bags)  # first-order weights
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, idx, bag):
        e = self.embed(idx, bag)
        return self.bias + self.linear(idx, bag).sum(1) + fm_interaction(e)


class DeepFM(nn.Module):
    """FM + an MLP over the concatenated embeddings (Guo et al. 2017)."""

    def __init__(
        self, vocab_size, num_fields, bags=(), embed_dim=10, hidden=(400, 400, 400), dropout=0.0, mode="dfa", seed=0
    ):
        super().__init__()
        self.embed = FieldEmbedding(vocab_size, num_fields, embed_dim, bags)
        self.linear = FieldEmbedding(vocab_size, num_fields, 1, bags)  # first-order weights
        self.bias = nn.Parameter(torch.zeros(1))
        self.mlp = mlp(self.embed.num_fields * embed_dim, hidden, dropout)
        self.out = nn.Linear(hidden[-1], 1)
        self.dfa = dk.DFA(mode=mode, seed=seed)

    def fm_part(self, idx, bag):
        """The MLP's input and the FM part's logit (bias, first-order weights, pairwise term)."""
        e = self.embed(idx, bag)
        fm = self.bias + self.linear(idx, bag).sum(1) + fm_interaction(e)
        # With DFA (and the direct methods, and shallow) the MLP reads the embeddings detached: they
        # learn from the (exact) FM part only. BP and the layer-wise methods carry the MLP's gradient
        # (exact, or through each layer's B) down into them.
        h = (e if self.dfa.mode in ("bp", *dk.methods.LAYERWISE) else e.detach()).flatten(1)
        return h, fm

    def forward(self, idx, bag):
        h, fm = self.fm_part(idx, bag)
        for block in self.mlp:
            h = self.dfa.point(block(h))
        return self.dfa(fm + self.out(h))


class CrossLayer(nn.Module):
    """DCN's cross layer: x_{l+1} = x_0 * (x_l . w) + b + x_l."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Linear(d, 1, bias=False)
        self.b = nn.Parameter(torch.zeros(d))

    def forward(self, x0, x):
        return x0 * self.w(x) + self.b + x


class DCN(nn.Module):
    """Deep & Cross Network (Wang et al. 2017): a cross stack and an MLP side by side on the
    embeddings, their outputs stacked into the logit. Points: the embeddings, every cross layer and
    MLP block but the last of each, and the stack (which is the output of those last two)."""

    def __init__(
        self,
        vocab_size,
        num_fields,
        bags=(),
        embed_dim=16,
        cross_layers=6,
        hidden=(1024, 1024),
        dropout=0.0,
        mode="dfa",
        seed=0,
    ):
        super().__init__()
        self.embed = FieldEmbedding(vocab_size, num_fields, embed_dim, bags)
        d = self.embed.num_fields * embed_dim
        self.cross = nn.ModuleList(CrossLayer(d) for _ in range(cross_layers))
        self.mlp = mlp(d, hidden, dropout)
        self.out = nn.Linear(d + hidden[-1], 1)
        self.dfa = dk.DFA(mode=mode, seed=seed)

    def forward(self, idx, bag):
        x0 = self.dfa.point(self.embed(idx, bag)).flatten(1)
        x = x0
        for layer in self.cross[:-1]:
            x = self.dfa.point(layer(x0, x))
        h = x0
        for block in self.mlp[:-1]:
            h = self.dfa.point(block(h))
        # the last cross layer and MLP block learn from the stack's point
        stack = self.dfa.point(torch.cat([self.cross[-1](x0, x), self.mlp[-1](h)], 1))
        return self.dfa(self.out(stack))


class InteractingLayer(nn.Module):
    """AutoInt's multi-head self-attention over fields, with a residual projection and ReLU."""

    def __init__(self, d_in, d_att, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_in, 3 * d_att, bias=False)
        self.res = nn.Linear(d_in, d_att, bias=False)

    def forward(self, x):  # [B, F, d_in]
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        o = nn.functional.scaled_dot_product_attention(q, k, v)  # [B, heads, F, d_head]
        return torch.relu(o.transpose(1, 2).flatten(2) + self.res(x))  # [B, F, d_att]


class AutoInt(nn.Module):
    """AutoInt (Song et al. 2019): self-attention layers over the field embeddings, then a linear
    logit. Points: the embeddings and every attention layer."""

    def __init__(self, vocab_size, num_fields, bags=(), embed_dim=16, layers=3, heads=2, d_att=32, mode="dfa", seed=0):
        super().__init__()
        self.embed = FieldEmbedding(vocab_size, num_fields, embed_dim, bags)
        dims = [embed_dim] + [d_att] * layers
        self.attn = nn.ModuleList(InteractingLayer(a, b, heads) for a, b in zip(dims, dims[1:]))
        self.out = nn.Linear(self.embed.num_fields * d_att, 1)
        self.dfa = dk.DFA(mode=mode, seed=seed)

    def forward(self, idx, bag):
        h = self.dfa.point(self.embed(idx, bag))  # [B, F, d]
        for layer in self.attn:
            h = self.dfa.point(layer(h))
        return self.dfa(self.out(h.flatten(1)))


class AFN(nn.Module):
    """Adaptive Factorization Network (Cheng et al. 2020): a logarithmic layer learns arbitrary-order
    cross features exp(sum_f w_f ln|e_f|), then an MLP. Points: the logarithmic layer and every
    MLP block."""

    def __init__(
        self,
        vocab_size,
        num_fields,
        bags=(),
        embed_dim=10,
        lnn=1500,
        hidden=(400, 400, 400),
        dropout=0.0,
        mode="dfa",
        seed=0,
    ):
        super().__init__()
        self.embed = FieldEmbedding(vocab_size, num_fields, embed_dim, bags)
        F = self.embed.num_fields
        self.log_bn = nn.BatchNorm1d(F)
        self.lnn = nn.Linear(F, lnn)
        self.exp_bn = nn.BatchNorm1d(lnn)
        self.mlp = mlp(lnn * embed_dim, hidden, dropout)
        self.out = nn.Linear(hidden[-1], 1)
        self.dfa = dk.DFA(mode=mode, seed=seed)

    def forward(self, idx, bag):
        e = self.embed(idx, bag)  # [B, F, d]
        log_e = self.log_bn(torch.log(e.abs().clamp_min(1e-5)))
        cross = torch.exp(self.lnn(log_e.transpose(1, 2)))  # [B, d, lnn]
        h = self.dfa.point(self.exp_bn(cross.transpose(1, 2)).flatten(1))  # [B, lnn * d]
        for block in self.mlp:
            h = self.dfa.point(block(h))
        return self.dfa(self.out(h))


MODELS = {"fm": FM, "deepfm": DeepFM, "dcn": DCN, "autoint": AutoInt, "afn": AFN}
