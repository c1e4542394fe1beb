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

Two architectures, chosen by keyword (the defaults are the first):

- GPT-2 style: pre-LN blocks with a final LayerNorm, learned positions (in mode dfa they learn
  from the first point's signal, like the token embedding), GELU, a head without bias, GPT-2's
  initialisation (normal 0.02, residual projections scaled by 1/sqrt(2 layers)).
- Paper 1's (its ``LMTransformer``, the original Transformer's encoder layer under a causal mask):
  ``pre_ln=False`` (post-LN, no final LayerNorm), ``positions="sinusoidal"`` (fixed, nothing to
  learn), ``embed_scale=True`` (token embeddings times sqrt(d_model)), ``activation="relu"``,
  ``ffn_dropout=True`` (dropout after the FFN's activation), ``head_bias=True`` and
  ``init="paper"`` (token embedding and head uniform in +-0.1, the head's bias zero, the blocks
  PyTorch's defaults: qkv Xavier-uniform with zero bias as nn.MultiheadAttention, the other
  linears nn.Linear's own, the attention output's bias zero). :data:`PAPER_ARCHITECTURE` holds
  these keywords. Not reproduced: nn.TransformerEncoder deep-copies one initialised layer, so the
  paper's blocks all start from the same weights; ours are drawn independently.
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

import dfa_kernels as dk

PLACEMENTS = ("macro", "micro", "linear")
POINTS_PER_BLOCK = {"macro": 1, "micro": 3, "linear": 6}
POSITIONS = ("learned", "sinusoidal")
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}
INITS = ("gpt2", "paper")
# paper 1's architecture (see the module doc), as TransformerLM keywords
PAPER_ARCHITECTURE = dict(
    pre_ln=False,
    positions="sinusoidal",
    embed_scale=True,
    activation="relu",
    ffn_dropout=True,
    head_bias=True,
    init="paper",
)


def sinusoidal_positions(context: int, d_model: int) -> torch.Tensor:
    """The original Transformer's fixed position encodings [context, d_model] (sin on even
    features, cos on odd ones, wavelengths from 2 pi to 10000 * 2 pi)."""
    position = torch.arange(context, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(context, d_model)
    table[:, 0::2] = torch.sin(position * rate)
    table[:, 1::2] = torch.cos(position * rate)[:, : d_model // 2]
    return table


class Block(nn.Module):
    """One Transformer block: causal self-attention then a GELU MLP, each with a residual.

    ``dfa`` (micro placement only) receives the inner feedback points; ``fused`` writes the FFN
    point as ``dfa.linear(x, fc1, activation)`` instead of ``dfa.point(activation(fc1(x)))`` (same
    maths). ``ffn_dropout``: dropout after the activation too (PyTorch's encoder layer, paper 1's);
    the micro placement's FFN point then sits after it with ``fused=False`` (paper 1's order), before
    it with ``fused=True``.
    """

    def __init__(
        self,
        d_model: int,
        heads: int,
        d_ff: int,
        dropout: float = 0.0,
        pre_ln: bool = True,
        activation: str = "gelu",
        ffn_dropout: bool = False,
    ):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} must be a multiple of heads={heads}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}; got {activation!r}")
        self.heads, self.pre_ln, self.dropout = heads, pre_ln, dropout
        self.activation, self.ffn_dropout = activation, ffn_dropout
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.fc1, self.fc2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def act_drop(self, h):
        """Dropout after the FFN's activation (``ffn_dropout``), else the identity."""
        return self.drop(h) if self.ffn_dropout else h

    def attend(self, qkv):
        """Causal multi-head attention of the qkv projection [B, T, 3C]; returns [B, T, C] (before proj)."""
        B, T, C3 = qkv.shape
        C = C3 // 3
        q, k, v = qkv.view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        dropout = self.dropout if self.training else 0.0
        if fwAD.unpack_dual(qkv).tangent is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:  # a forward-mode pass (mode "fdfa"): attention written out, its ops all with forward derivatives
            causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
            scores = ((q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])).masked_fill(~causal, float("-inf"))
            # softmax by hand: torch's softmax under forward mode breaks the backward of a second block
            # (its saved output is modified in place: torch 2.14)
            probs = torch.exp(scores - scores.detach().amax(-1, keepdim=True))
            a = F.dropout(probs / probs.sum(-1, keepdim=True), dropout) @ v
        return a.transpose(1, 2).reshape(B, T, C)

    def attention(self, x):
        return self.drop(self.proj(self.attend(self.qkv(x))))

    def forward(self, x, dfa: dk.DFA | None = None, fused: bool = False):
        point = dfa.point if dfa is not None else (lambda h: h)

        def ffn_hidden(x):
            if dfa is not None and fused:
                return self.act_drop(dfa.linear(x, self.fc1, self.activation))
            return point(self.act_drop(ACTIVATIONS[self.activation](self.fc1(x))))

        if self.pre_ln:  # GPT-2 style
            x = point(x + self.attention(self.ln1(x)))
            return x + self.drop(self.fc2(ffn_hidden(self.ln2(x))))
        x = point(self.ln1(x + self.attention(x)))  # original (post-LN) Transformer
        return self.ln2(x + self.drop(self.fc2(ffn_hidden(x))))

    def forward_linear(self, x, dfa: dk.DFA, fused: bool = True):
        """The block with a point at every linear and LayerNorm output (placement "linear")."""

        def linear(h, layer, activation=None):
            if fused:
                return dfa.linear(h, layer, activation)
            return dfa.point(layer(h) if activation is None else ACTIVATIONS[activation](layer(h)))

        def attention(h):
            return self.drop(linear(self.attend(linear(h, self.qkv)), self.proj))

        def ffn(h):
            return self.drop(linear(self.act_drop(linear(h, self.fc1, self.activation)), self.fc2))

        if self.pre_ln:
            x = x + attention(dfa.point(self.ln1(x)))
            return x + ffn(dfa.point(self.ln2(x)))
        x = dfa.point(self.ln1(x + attention(x)))
        return dfa.point(self.ln2(x + ffn(x)))


class TransformerLM(nn.Module):
    """Causal Transformer LM with DFA feedback points; ``model.dfa`` is its :class:`dk.DFA`."""

    def __init__(
        self,
        vocab_size: int,
        context: int = 128,
        layers: int = 4,
        d_model: int = 128,
        heads: int = 4,
        d_ff: int | None = None,
        dropout: float = 0.0,
        pre_ln: bool = True,
        positions: str = "learned",
        embed_scale: bool = False,
        activation: str = "gelu",
        ffn_dropout: bool = False,
        head_bias: bool = False,
        init: str = "gpt2",
        placement: str = "macro",
        error_at: str = "hidden",
        mode: str = "dfa",
        fused: bool = True,
        **dfa_kwargs,
    ):
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(map(repr, PLACEMENTS))}; got {placement!r}")
        if error_at not in ("hidden", "logits"):
            raise ValueError(f"error_at must be 'hidden' or 'logits'; got {error_at!r}")
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(map(repr, POSITIONS))}; got {positions!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(map(repr, INITS))}; got {init!r}")
        self.context, self.placement, self.error_at, self.fused = context, placement, error_at, fused
        self.embed_scale = math.sqrt(d_model) if embed_scale else 1.0
        self.tok = nn.Embedding(vocab_size, d_model)
        if positions == "learned":
            self.pos = nn.Embedding(context, d_model)
        else:  # fixed: a buffer, no parameter
            self.pos = None
            self.register_buffer("pos_table", sinusoidal_positions(context, d_model), persistent=False)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(d_model, heads, d_ff or 4 * d_model, dropout, pre_ln, activation, ffn_dropout) for _ in range(layers)
        )
        self.ln_f = nn.LayerNorm(d_model) if pre_ln else nn.Identity()
        self.head = nn.Linear(d_model, vocab_size, bias=head_bias)
        if placement == "linear":
            dfa_kwargs.setdefault("layout", "shared")  # paper 2's single B e (see the module doc)
        self.dfa = dk.DFA(mode=mode, **dfa_kwargs)
        if init == "gpt2":
            self.apply(self._init)
            for name, p in self.named_parameters():  # GPT-2: scale the residual projections
                if name.endswith(("proj.weight", "fc2.weight")):
                    nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers))
        else:
            self._init_paper()

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def _init_paper(self):
        """Paper 1's initialisation: its init_weights (token embedding and head uniform in +-0.1,
        head bias 0) over PyTorch's defaults for the blocks (nn.MultiheadAttention: Xavier-uniform
        in-projection, zero in- and out-projection biases; nn.Linear's own for the rest). Learned
        positions, which the paper does not have, keep normal(0.02)."""
        nn.init.uniform_(self.tok.weight, -0.1, 0.1)
        nn.init.uniform_(self.head.weight, -0.1, 0.1)
        if self.head.bias is not None:
            nn.init.zeros_(self.head.bias)
        if self.pos is not None:
            nn.init.normal_(self.pos.weight, std=0.02)
        for block in self.blocks:
            nn.init.xavier_uniform_(block.qkv.weight)
            nn.init.zeros_(block.qkv.bias)
            block.proj.reset_parameters()
            nn.init.zeros_(block.proj.bias)
            block.fc1.reset_parameters()
            block.fc2.reset_parameters()

    @property
    def num_points(self) -> int:
        return len(self.blocks) * POINTS_PER_BLOCK[self.placement] + (self.placement == "linear")

    def hidden(self, idx):
        """The final hidden state [B, T, d_model] (after the final LN), every point recorded."""
        T = idx.shape[1]
        if T > self.context:
            raise ValueError(f"sequence length {T} exceeds the model's context {self.context}")
        positions = self.pos(torch.arange(T, device=idx.device)) if self.pos is not None else self.pos_table[:T]
        x = self.tok(idx)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        x = self.drop(x + positions)
        if self.placement == "linear":
            x = self.dfa.point(x)  # the embeddings' own signal
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
            return self.head(self.dfa(h))  # error e = dL/dh: [B, T, d_model]
        return self.dfa(self.head(h))  # error e = dL/dlogits: [B, T, vocab]
