"""A causal decoder-only Transformer language model trained with Direct Feedback Alignment.

``TransformerLM(vocab_size, ...)`` maps token ids ``[B, T]`` to logits ``[B, T, vocab]``. Feedback
points (``h = self.dfa.point(h)``) sit, per block:

- ``placement="macro"``: after the block (``layers`` points);
- ``placement="micro"``: after attention (+ its residual, and its LN in post-LN), after the FFN's
  hidden activation, and after the block (``3 * layers`` points). With ``fused=True`` (default)
  the FFN point is ``dfa.linear(x, fc1, "gelu")``: GELU's derivative is applied inside the
  projection and every block's fc1 weight gradient comes from one grouped launch.
- ``placement="linear"``: at the output of every linear layer (qkv, the attention's output
  projection, fc1 with its GELU, fc2) and of every LayerNorm, plus one on the embeddings
  (``6 * layers + 1`` points): nothing below the head backpropagates, so no input-gradient GEMM
  and no attention backward runs in the blocks. With ``fused=True`` every linear point is
  ``dfa.linear`` (its weight gradient from the grouped launch); ``fused=False`` writes them as
  ``dfa.point(layer(x))``. What each parameter learns from, in mode "dfa":

  * qkv, proj, fc1, fc2 (weights and biases): their own output's signal ``e @ B_l`` (times GELU'
    for fc1), against their input; no gradient reaches their input.
  * ln1, ln2 gains and biases: their output's signal, through LayerNorm's own backward, which
    computes no input gradient (the residual stream they read carries no autograd graph).
  * token and position embeddings: the signal of the embedding point (the blocks' input).
  * the residual stream: every block adds detached outputs to it, so it carries no gradient.
  * final LayerNorm and head: exact gradients, as in every placement.

  Its default feedback is the shared layout (paper 2's single ``B e`` for all layers: one matrix
  of the widest point's width, ``d_ff`` columns, each point reading its first ``d_l``), so the
  projection costs ``2 * d_e * d_ff`` FLOPs per token instead of ``2 * d_e * 11 * d_model *
  layers`` for independent matrices, as many as the input gradients it replaces; pass
  ``layout="independent"`` to change it.

The DFA error is taken, by default (``error_at="hidden"``), at the final hidden state just before
the vocabulary projection: the final LayerNorm and the head sit after the last point and learn
exactly, and the error is ``d_model`` wide. ``error_at="logits"`` takes it after the head instead
(a vocabulary-wide error, as in plain DFA); the same layers learn exactly. ``model.loss(idx,
targets)`` then never materialises the [B, T, vocab] logits: the loss, its gradient and the
gradient's projection to every point run chunk by chunk (``dfa.linear_cross_entropy``). In ``mode="shallow"``
only those (final LN + head) learn; ``mode="bp"`` is ordinary backprop through the same model.
The head is not tied to the token embedding, so that shallow mode really freezes the embedding.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import dfa_kernels as dk

PLACEMENTS = ("macro", "micro", "linear")
POINTS_PER_BLOCK = {"macro": 1, "micro": 3, "linear": 6}


class Block(nn.Module):
    """One Transformer block: causal self-attention then a GELU MLP, each with a residual.

    ``dfa`` (micro placement only) receives the inner feedback points; ``fused`` writes the FFN
    point as ``dfa.linear(x, fc1, "gelu")`` instead of ``dfa.point(gelu(fc1(x)))`` (same maths).
    """

    def __init__(self, d_model: int, heads: int, d_ff: int, dropout: float = 0.0, pre_ln: bool = True):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} must be a multiple of heads={heads}")
        self.heads, self.pre_ln, self.dropout = heads, pre_ln, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.fc1, self.fc2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def attend(self, qkv):
        """Causal multi-head attention of the qkv projection [B, T, 3C]; returns [B, T, C] (before proj)."""
        B, T, C3 = qkv.shape
        C = C3 // 3
        q, k, v = qkv.view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return a.transpose(1, 2).reshape(B, T, C)

    def attention(self, x):
        return self.drop(self.proj(self.attend(self.qkv(x))))

    def forward(self, x, dfa: dk.DFA | None = None, fused: bool = False):
        point = dfa.point if dfa is not None else (lambda h: h)

        def ffn_hidden(x):
            if dfa is not None and fused:
                return dfa.linear(x, self.fc1, "gelu")
            return point(F.gelu(self.fc1(x)))

        if self.pre_ln:                                     # GPT-2 style
            x = point(x + self.attention(self.ln1(x)))
            return x + self.drop(self.fc2(ffn_hidden(self.ln2(x))))
        x = point(self.ln1(x + self.attention(x)))          # original (post-LN) Transformer
        return self.ln2(x + self.drop(self.fc2(ffn_hidden(x))))

    def forward_linear(self, x, dfa: dk.DFA, fused: bool = True):
        """The block with a point at every linear and LayerNorm output (placement "linear")."""
        def linear(h, layer, activation=None):
            if fused:
                return dfa.linear(h, layer, activation)
            return dfa.point(layer(h) if activation is None else F.gelu(layer(h)))

        def attention(h):
            return self.drop(linear(self.attend(linear(h, self.qkv)), self.proj))

        def ffn(h):
            return self.drop(linear(linear(h, self.fc1, "gelu"), self.fc2))

        if self.pre_ln:
            x = x + attention(dfa.point(self.ln1(x)))
            return x + ffn(dfa.point(self.ln2(x)))
        x = dfa.point(self.ln1(x + attention(x)))
        return dfa.point(self.ln2(x + ffn(x)))


class TransformerLM(nn.Module):
    """Causal Transformer LM with DFA feedback points; ``model.dfa`` is its :class:`dk.DFA`."""

    def __init__(self, vocab_size: int, context: int = 128, layers: int = 4, d_model: int = 128,
                 heads: int = 4, d_ff: int | None = None, dropout: float = 0.0, pre_ln: bool = True,
                 placement: str = "macro", error_at: str = "hidden", mode: str = "dfa", fused: bool = True,
                 **dfa_kwargs):
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(map(repr, PLACEMENTS))}; got {placement!r}")
        if error_at not in ("hidden", "logits"):
            raise ValueError(f"error_at must be 'hidden' or 'logits'; got {error_at!r}")
        self.context, self.placement, self.error_at, self.fused = context, placement, error_at, fused
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, heads, d_ff or 4 * d_model, dropout, pre_ln)
                                    for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model) if pre_ln else nn.Identity()
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        if placement == "linear":
            dfa_kwargs.setdefault("layout", "shared")       # paper 2's single B e (see the module doc)
        self.dfa = dk.DFA(mode=mode, **dfa_kwargs)
        self.apply(self._init)
        for name, p in self.named_parameters():             # GPT-2: scale the residual projections
            if name.endswith(("proj.weight", "fc2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def num_points(self) -> int:
        return len(self.blocks) * POINTS_PER_BLOCK[self.placement] + (self.placement == "linear")

    def hidden(self, idx):
        """The final hidden state [B, T, d_model] (after the final LN), every point recorded."""
        T = idx.shape[1]
        if T > self.context:
            raise ValueError(f"sequence length {T} exceeds the model's context {self.context}")
        x = self.drop(self.tok(idx) + self.pos(torch.arange(T, device=idx.device)))
        if self.placement == "linear":
            x = self.dfa.point(x)                           # the embeddings' own signal
            for block in self.blocks:
                x = block.forward_linear(x, self.dfa, self.fused)
            return self.ln_f(x)
        inner = self.dfa if self.placement == "micro" else None
        for block in self.blocks:
            x = self.dfa.point(block(x, inner, self.fused))
        return self.ln_f(x)

    def loss(self, idx, targets):
        """Mean next-token cross-entropy; with ``error_at="logits"`` through the fused head (no
        [B, T, vocab] logits are held)."""
        if self.error_at == "logits":
            return self.dfa.linear_cross_entropy(self.hidden(idx), self.head, targets)
        return F.cross_entropy(self(idx).float().flatten(0, 1), targets.flatten())

    def forward(self, idx):
        h = self.hidden(idx)
        if self.error_at == "hidden":
            return self.head(self.dfa(h))                   # error e = dL/dh: [B, T, d_model]
        return self.dfa(self.head(h))                       # error e = dL/dlogits: [B, T, vocab]
