"""A model as a pipeline sees it: a prefix, a list of cuttable blocks, a suffix, a head and a loss.

``Parts(dfa, blocks, prefix=, suffix=, head=, loss=)`` describes one DFA model: stage 0 runs the
prefix (the embeddings; it takes the model's inputs, several when they are a tuple) and its
blocks, stage S-1 its blocks and the suffix, whose output ``y`` is where the DFA error ``e = dL/dy``
is taken (the single-process model's ``dfa(y)``), then the head (layers after the error: exact
gradients) and the loss. Stages are cut only between blocks.

What crosses a cut is a tensor or a tuple of tensors (the blocks' state: DCN carries its cross
stack, its MLP and their shared input side by side). With ``skip=True`` the prefix returns
``(x, s)``: ``x`` enters the blocks, ``s`` is a branch beside them (DeepFM's FM part) that rides
along with the blocks' state, untouched, and is added to the suffix's output, ``y = suffix(...) + s``.
Its gradient is ``dL/dy = e`` itself, which every stage receives under DFA's schedule: stage 0
backpropagates the branch from it, exactly, and nothing travels backward.
:func:`parts_of` describes the zoo's TransformerLM and recommender models; :func:`sequential_parts`
a plain stack.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import DFA


@dataclasses.dataclass
class Parts:
    dfa: DFA
    blocks: list[nn.Module]
    prefix: nn.Module | None = None
    suffix: nn.Module | None = None
    head: nn.Module | None = None
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    skip: bool = False

    def __post_init__(self):
        if not isinstance(self.dfa, DFA):
            raise TypeError(f"Parts(dfa=): expects the model's dk.DFA module; got {type(self.dfa).__name__}")
        if (
            not isinstance(self.blocks, (list, tuple, nn.ModuleList))
            or not self.blocks
            or not all(isinstance(b, nn.Module) for b in self.blocks)
        ):
            raise ValueError(
                f"Parts(blocks=): expects a non-empty list of nn.Modules (the cuttable blocks); got {self.blocks!r:.80}"
            )
        for name in ("prefix", "suffix", "head"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, nn.Module):
                raise TypeError(f"Parts({name}=): expects an nn.Module or None; got {type(value).__name__}")
        if not callable(self.loss):
            raise TypeError(f"Parts(loss=): expects a callable loss(output, target); got {type(self.loss).__name__}")
        if self.skip and (self.prefix is None or self.suffix is None):
            raise ValueError(
                "Parts(skip=True): the prefix makes the branch and the suffix's output receives it: give both"
            )
        self.blocks = list(self.blocks)


class StageModule(nn.Module):
    """One stage's forward: (prefix,) its blocks (, suffix (, head)). The last stage holds the head
    (it owns its parameters) but runs it only with `with_head` (torch's schedules: the loss reads
    its output; DFA's schedule runs it after taking y). Points recorded here that no ``dfa(y)``
    consumes (mode "bp" under torch's schedules) are dropped after each forward. With a skip branch
    a stage before the last returns ``(*state, s)``, and a stage after the first receives it so."""

    def __init__(
        self, parts: Parts, first: int, stop: int, is_first: bool, is_last: bool, with_head: bool, drop_points: bool
    ):
        super().__init__()
        self.prefix = parts.prefix if is_first else None
        self.blocks = nn.ModuleList(parts.blocks[first:stop])
        self.suffix = parts.suffix if is_last else None
        self.head = parts.head if is_last else None
        self.dfa, self.with_head, self.drop_points = parts.dfa, with_head, drop_points
        self.skip = parts.skip

    def forward(self, *x):
        if len(x) == 1 and isinstance(x[0], tuple):  # a tuple given as one argument
            x = x[0]
        skip = None
        if self.skip and self.prefix is None:  # the branch received with the state
            *x, skip = x
        x = tuple(x) if len(x) > 1 else x[0]  # several inputs reach the prefix as separate arguments
        if self.prefix is not None:
            x = _apply(self.prefix, x)
            if self.skip:
                x, skip = x
        for block in self.blocks:
            x = _apply(block, x)
        if self.suffix is not None:
            x = _apply(self.suffix, x)
            if skip is not None:  # y = suffix(...) + s
                x, skip = x + skip, None
        if skip is not None:  # passed on to the next stage
            x = (*x, skip) if isinstance(x, tuple) else (x, skip)
        if self.with_head and self.head is not None:
            x = self.head(x)
        if self.drop_points:
            self.dfa.discard_points()
        return x


def _apply(module: nn.Module, x):
    """A module on one tensor, or on a tuple's tensors as separate arguments."""
    return module(*x) if isinstance(x, tuple) else module(x)


def balanced_cuts(blocks: int, stages: int) -> list[int]:
    """Block index where each stage starts, [0, ..., blocks]: contiguous, sizes differing by at most one."""
    if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1:
        raise ValueError(f"stages must be a positive int; got {stages!r}")
    if stages > blocks:
        raise ValueError(
            f"stages={stages} is larger than the model's {blocks} cuttable blocks: a stage boundary "
            f"falls only between blocks, so at most {blocks} stages"
        )
    base, extra = divmod(blocks, stages)
    cuts = [0]
    for s in range(stages):
        cuts.append(cuts[-1] + base + (s < extra))
    return cuts


# ---------------------------------------------------------------- the zoo's models
class _LMEmbed(nn.Module):
    """TransformerLM's embeddings (tokens, positions, dropout; in the linear placement, their point)."""

    def __init__(self, model):
        super().__init__()
        self.tok, self.pos, self.drop, self.dfa = model.tok, model.pos, model.drop, model.dfa
        if model.pos is None:  # fixed positions: the model's own table
            self.register_buffer("pos_table", model.pos_table, persistent=False)
        self.context, self.embed_scale, self.placement = model.context, model.embed_scale, model.placement

    def forward(self, idx):
        T = idx.shape[1]
        if T > self.context:
            raise ValueError(f"sequence length {T} exceeds the model's context {self.context}")
        positions = self.pos(torch.arange(T, device=idx.device)) if self.pos is not None else self.pos_table[:T]
        x = self.tok(idx)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        x = self.drop(x + positions)
        return self.dfa.point(x) if self.placement == "linear" else x


class _LMBlock(nn.Module):
    """Block i of a TransformerLM with its points, as TransformerLM.hidden runs it."""

    def __init__(self, model, index: int):
        super().__init__()
        self.block, self.dfa = model.blocks[index], model.dfa
        self.placement, self.fused = model.placement, model.fused

    def forward(self, x):
        if self.placement == "linear":
            return self.block.forward_linear(x, self.dfa, self.fused)
        return self.dfa.point(self.block(x, self.dfa if self.placement == "micro" else None, self.fused))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """TransformerLM.loss's mean next-token cross-entropy."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def parts_of(model: nn.Module) -> Parts:
    """The pipeline's view of a zoo model (TransformerLM, every placement and error_at); a model
    of another kind is described with :class:`Parts` (or :func:`sequential_parts`)."""
    from ..zoo.models.transformer import TransformerLM

    if isinstance(model, Parts):
        return model
    from ..zoo.models import recsys

    if isinstance(model, (recsys.AutoInt, recsys.AFN, recsys.DeepFM, recsys.DCN)):
        return _recsys_parts(model)
    if isinstance(model, TransformerLM):
        blocks = [_LMBlock(model, i) for i in range(len(model.blocks))]
        if model.error_at == "hidden":  # e = dL/dh after the final LN; the head learns exactly
            return Parts(model.dfa, blocks, prefix=_LMEmbed(model), suffix=model.ln_f, head=model.head, loss=lm_loss)
        return Parts(
            model.dfa, blocks, prefix=_LMEmbed(model), suffix=nn.Sequential(model.ln_f, model.head), loss=lm_loss
        )
    raise TypeError(
        f"no pipeline description of {type(model).__name__}: describe it with "
        f"dfa_kernels.pipeline.Parts(dfa, blocks, prefix=, suffix=, head=, loss=)"
    )


def click_loss(logit: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The recommender recipes' loss: binary cross-entropy of the one logit [B, 1]."""
    return F.binary_cross_entropy_with_logits(logit[:, 0], label)


class _Flatten(nn.Module):
    """A layer reading its input flattened after the batch dimension (AutoInt's output layer)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x.flatten(1))


class _AFNLog(nn.Module):
    """AFN's logarithmic layer (its forward before the first point)."""

    def __init__(self, model):
        super().__init__()
        self.log_bn, self.lnn, self.exp_bn = model.log_bn, model.lnn, model.exp_bn

    def forward(self, e):
        log_e = self.log_bn(torch.log(e.abs().clamp_min(1e-5)))
        cross = torch.exp(self.lnn(log_e.transpose(1, 2)))
        return self.exp_bn(cross.transpose(1, 2)).flatten(1)


class _DeepFMPrefix(nn.Module):
    """DeepFM's embeddings and FM part: (the MLP's input, the FM logit: the skip branch)."""

    def __init__(self, model):
        super().__init__()
        self.embed, self.linear, self.bias, self.dfa = model.embed, model.linear, model.bias, model.dfa

    def forward(self, idx, bag):
        from ..zoo.models.recsys import DeepFM

        return DeepFM.fm_part(self, idx, bag)  # the model's own code, on its modules held here


class _DCNBlock(nn.Module):
    """One step of DCN's state (x0, x: the cross stack, h: the MLP), as DCN.forward runs them in
    order: the embeddings' point (x0 = x = h), a cross layer, an MLP block, or the stack's point
    (the last cross layer and MLP block, concatenated; the state ends there)."""

    def __init__(self, model, kind: str, layer: nn.Module | None = None):
        super().__init__()
        self.dfa, self.kind, self.layer = model.dfa, kind, layer
        if kind == "stack":
            self.cross, self.deep = model.cross[-1], model.mlp[-1]

    def forward(self, *state):
        point = self.dfa.point
        if self.kind == "embed":
            x0 = point(state[0]).flatten(1)
            return x0, x0, x0
        x0, x, h = state
        if self.kind == "cross":
            return x0, point(self.layer(x0, x)), h
        if self.kind == "deep":
            return x0, x, point(self.layer(h))
        return point(torch.cat([self.cross(x0, x), self.deep(h)], 1))


def _recsys_parts(model) -> Parts:
    """The recommender models as the zoo runs them, the embeddings the prefix and one block per
    point, e = dL/dlogit: AutoInt (the embeddings, every attention layer) and AFN (the logarithmic
    layer, every MLP block), chains; DeepFM (its MLP blocks; the FM part, beside them, a skip branch
    from the prefix to the logit); DCN (the embeddings, its cross layers, its MLP blocks, the stack:
    the state crossing a cut is (x0, x, h))."""
    from ..zoo.models.recsys import AFN, DCN, DeepFM

    dfa = model.dfa
    if isinstance(model, DeepFM):
        blocks = [_Point(block, dfa, None) for block in model.mlp]
        return Parts(dfa, blocks, prefix=_DeepFMPrefix(model), suffix=model.out, loss=click_loss, skip=True)
    if isinstance(model, DCN):
        blocks = [
            _DCNBlock(model, "embed"),
            *(_DCNBlock(model, "cross", layer) for layer in model.cross[:-1]),
            *(_DCNBlock(model, "deep", block) for block in model.mlp[:-1]),
            _DCNBlock(model, "stack"),
        ]
        return Parts(dfa, blocks, prefix=model.embed, suffix=model.out, loss=click_loss)
    if isinstance(model, AFN):
        layers, suffix = [_AFNLog(model), *model.mlp], model.out
    else:
        layers, suffix = [nn.Identity(), *model.attn], _Flatten(model.out)
    blocks = [_Point(layer, dfa, None) for layer in layers]
    return Parts(dfa, blocks, prefix=model.embed, suffix=suffix, loss=click_loss)


class _Point(nn.Module):
    """A layer followed by its feedback point (an activation fused into the point when given)."""

    def __init__(self, layer: nn.Module, dfa: DFA, activation: str | None):
        super().__init__()
        self.layer, self.dfa, self.activation = layer, dfa, activation

    def forward(self, x):
        return self.dfa.point(self.layer(x), activation=self.activation)


def sequential_parts(
    dfa: DFA, hidden: list[nn.Module], head: nn.Module, activation: str | None = "relu", loss=F.cross_entropy
) -> Parts:
    """An MLP-like stack: each hidden layer followed by a point (``dfa.point(layer(x), activation)``),
    then `head` as the suffix: e is the head's output's error (the single-process model is
    ``dfa(head(...dfa.point(layer(x), activation)...))``)."""
    return Parts(dfa, [_Point(layer, dfa, activation) for layer in hidden], suffix=head, loss=loss)
