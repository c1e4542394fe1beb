"""Hugging Face causal LMs trained with DFA: GPT-2, Llama, and any decoder whose blocks look alike.

``convert(model, placement=..., error_at=...)`` takes a ``transformers`` causal LM (e.g.
``GPT2LMHeadModel``, ``LlamaForCausalLM``; a Mistral, Qwen2, GPT-NeoX... with the same layout)
and returns a :class:`DFAForCausalLM`: the same model, with feedback points put in by forward
hooks (module tree, parameter names and weights unchanged), whose forward, ``generate()`` and
``save_pretrained()`` work as the model's own. The layout is read from the model, not from its
class name: the decoder blocks are the ``nn.ModuleList`` of ``config.num_hidden_layers`` blocks;
in each block, the attention is the child named ``*attn*``/``*attention*``, the MLP the child
holding an activation module, its down projection that child's last linear layer (``nn.Linear``
or transformers' ``Conv1D``); the final norm is the last norm after the blocks; the head is
``get_output_embeddings()``.

Placements (points are taken in every block; the residual stream is cut at every block boundary
so that no gradient reaches a layer around a point, see :mod:`dfa_kernels.convert`):

- ``"macro"`` (paper 1): a point on the residual stream after each block; the embeddings learn
  with the first block.
- ``"micro"``: after each block, at the attention's output, at the MLP's hidden activation (the
  down projection's input, which also covers gated MLPs: ``act(gate) * up``), and at the first
  block's input (the embeddings' own point).
- ``"linear"``: at the output of every linear layer of every block (q/k/v or GPT-2's fused
  ``c_attn``, the attention's output projection, MLP up/gate/down) and of every norm in the blocks,
  plus the first block's input; the stream is detached at every other block's input. No linear
  layer's input gradient and no attention backward is computed below the head.

Error: ``error_at="hidden"`` takes the DFA error at the final norm's output (the head and final
norm learn by exact gradient, the error is ``hidden_size`` wide); ``error_at="logits"`` takes it
after the head: with ``labels``, the loss runs through ``dfa.linear_cross_entropy`` (chunked: the
``[N, vocab]`` logits are never held; the output's ``logits`` is then None); without labels, the
logits are the DFA output.

``save_pretrained(path)`` writes the model as transformers does, plus a ``"dfa"`` entry in
``config.json`` (placement, error position, the DFA's options and its spec once a forward fixed
it); :meth:`DFAForCausalLM.from_pretrained` rebuilds the same DFA (the feedback matrix is a pure
function of the saved seed and spec, so it is the same matrix). A plain
``AutoModelForCausalLM.from_pretrained(path)`` loads the trained weights without DFA.
Gradient checkpointing is not supported (recomputed blocks would record their points twice).

Needs ``transformers`` only for :meth:`DFAForCausalLM.from_pretrained` and for the output object
of a fused-loss forward: ``pip install "dfa-kernels[hf]"``.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect

import torch
from torch import nn

from .convert import DFAModel, attach, is_activation, refuse_fdfa
from .feedback import FeedbackSpec
from .nn import DFA

PLACEMENTS = ("macro", "micro", "linear")
ERROR_AT = ("hidden", "logits")
INSTALL = 'pip install "dfa-kernels[hf]"  (or: pip install transformers)'
IGNORE_INDEX = -100  # transformers' label for positions without a loss


def require_transformers():
    """The transformers package, or an error saying how to install it."""
    try:
        return importlib.import_module("transformers")
    except ImportError as err:
        raise ModuleNotFoundError(
            f"dfa_kernels.huggingface needs the transformers package, which is not installed: {INSTALL}"
        ) from err


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2's linear layers, weights stored transposed)."""
    return isinstance(module, nn.Linear) or (
        type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers.")
    )


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or name.endswith(("LayerNorm", "RMSNorm", "Norm"))


@dataclasses.dataclass(frozen=True)
class DecoderLayout:
    """Module names of a decoder-only LM: the block list, and names *inside* each block."""

    blocks: str  # the nn.ModuleList of blocks, e.g. "transformer.h"
    count: int  # number of blocks
    final_norm: str  # e.g. "transformer.ln_f"
    head: str  # e.g. "lm_head"
    attention: str  # in a block, e.g. "attn"
    mlp_down: str  # in a block, the MLP's down projection, e.g. "mlp.c_proj"
    linears: tuple[str, ...]  # in a block, every linear layer
    norms: tuple[str, ...]  # in a block, every norm

    def in_blocks(self, relative: str) -> str:
        return f"{self.blocks}.*.{relative}"


def find_layout(model: nn.Module) -> DecoderLayout:
    """Read the decoder layout from a causal LM's modules (see the module docstring)."""
    names = {id(m): n for n, m in model.named_modules()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or id(head) not in names:
        raise ValueError(
            f"{type(model).__name__}: no linear vocabulary head found (get_output_embeddings() "
            f"returned {type(head).__name__}); expected a causal LM such as GPT2LMHeadModel"
        )
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None)
    lists = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.ModuleList)
        and len(m)
        and len({type(b) for b in m}) == 1
        and (layers is None or len(m) == layers)
    ]
    if not lists:
        raise ValueError(
            f"{type(model).__name__}: found no nn.ModuleList of "
            f"{layers if layers is not None else 'identical'} decoder blocks"
        )
    blocks_name, blocks = max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))
    after = False
    final_norm = None
    for n, m in model.named_modules():  # the last norm registered after the blocks, outside them
        if n == blocks_name:
            after = True
        elif after and not n.startswith(blocks_name + ".") and _is_norm(m):
            final_norm = n
    if final_norm is None:
        raise ValueError(f"{type(model).__name__}: no final norm after the blocks {blocks_name!r}")
    block = blocks[0]
    children = dict(block.named_children())
    attention = next((n for n in children if "attn" in n.lower() or "attention" in n.lower()), None)
    mlp = next((n for n, c in children.items() if n != attention and any(is_activation(m) for m in c.modules())), None)
    if attention is None or mlp is None:
        raise ValueError(
            f"{type(block).__name__} (in {blocks_name!r}): expected an attention child "
            f"(named *attn* or *attention*) and an MLP child holding an activation module; "
            f"children: {list(children)}"
        )
    mlp_linears = [f"{mlp}.{n}" if n else mlp for n, m in children[mlp].named_modules() if _is_linear(m)]
    linears = tuple(n for n, m in block.named_modules() if _is_linear(m))
    norms = tuple(n for n, m in block.named_modules() if _is_norm(m) and n)
    if not mlp_linears or not norms:
        raise ValueError(f"{type(block).__name__}: expected linear layers in its MLP {mlp!r} and norms in the block")
    return DecoderLayout(
        blocks_name, len(blocks), final_norm, names[id(head)], attention, mlp_linears[-1], linears, norms
    )


def placement_points(layout: DecoderLayout, placement: str) -> dict:
    """convert's points=, input_points= and detach= for a placement."""
    blocks = f"{layout.blocks}.*"
    first = f"{layout.blocks}.0"
    rest = [f"{layout.blocks}.{i}" for i in range(1, layout.count)] or None
    if placement == "macro":
        return {"points": blocks}
    if placement == "micro":
        return {
            "points": [blocks, layout.in_blocks(layout.attention)],
            "input_points": [first, layout.in_blocks(layout.mlp_down)],
        }
    return {
        "points": [layout.in_blocks(n) for n in layout.linears + layout.norms],
        "input_points": first,
        "detach": rest,
    }


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def convert(
    model: nn.Module,
    placement: str = "macro",
    error_at: str = "hidden",
    mode: str = "dfa",
    inplace: bool = False,
    check_residual: bool = True,
    **dfa_kwargs,
) -> DFAForCausalLM:
    """A Hugging Face causal LM with DFA feedback points (see the module docstring).

    placement: "macro" | "micro" | "linear"; error_at: "hidden" | "logits"; mode: "dfa" | "bp" |
    "shallow"; other keywords go to :class:`dk.DFA` (seed, distribution, layout, ...).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects a Hugging Face causal LM (an nn.Module); got {type(model).__name__}")
    _check_choice("placement", placement, PLACEMENTS)
    _check_choice("error_at", error_at, ERROR_AT)
    refuse_fdfa(model, mode)
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        raise ValueError(
            "gradient checkpointing is on: recomputed blocks would record their feedback points "
            "twice; call model.gradient_checkpointing_disable() first (DFA keeps no activations "
            "for an input-gradient chain anyway)"
        )
    layout = find_layout(model)
    dfa = DFA(mode=mode, **dfa_kwargs)
    model = model if inplace else copy.deepcopy(model)
    converted = DFAForCausalLM(model, dfa, layout, placement, error_at)
    return attach(converted, check_residual=check_residual, **placement_points(layout, placement))


class DFAForCausalLM(DFAModel):
    """A Hugging Face causal LM with DFA (made by :func:`convert`): ``.model`` is the transformers
    model (its attributes, ``config``, ``generate()``..., are reachable from here too), ``.dfa``
    the :class:`dk.DFA`."""

    def __init__(self, model: nn.Module, dfa: DFA, layout: DecoderLayout, placement: str, error_at: str):
        super().__init__(model, dfa, output_module=layout.final_norm if error_at == "hidden" else layout.head)
        self.layout, self.placement, self.error_at = layout, placement, error_at

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self._modules.get("model")
            if model is None or name.startswith("__"):
                raise
            return getattr(model, name)

    def forward(self, input_ids=None, labels=None, **kwargs):
        if labels is None or self.error_at == "hidden":
            return super().forward(input_ids=input_ids, labels=labels, **kwargs)
        return self._fused_loss_forward(input_ids, labels, **kwargs)

    def dfa_output(self, y):
        if self.error_at == "logits" and (not torch.is_grad_enabled() or self.dfa.mode != "dfa"):
            # logits of generation (often only the last position's): nothing to train, nothing to check
            self.dfa.discard_points()
            return y
        return super().dfa_output(y)

    def _fused_loss_forward(self, input_ids, labels, **kwargs):
        """The loss after the head through dfa.linear_cross_entropy: no [N, vocab] logits."""
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.long or labels.dim() != 2:
            raise ValueError(
                f"labels must be an int64 tensor [batch, seq] of token ids (-100: no loss); got "
                f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}"
            )
        ids = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if ids is not None and tuple(labels.shape) != tuple(ids.shape[:2]):
            raise ValueError(
                f"labels must have the shape of input_ids [batch, seq] = {tuple(ids.shape[:2])}; got "
                f"{tuple(labels.shape)}"
            )
        num_items = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        for unused in ("logits_to_keep", "num_logits_to_keep", "return_dict"):
            kwargs.pop(unused, None)
        self.begin_forward()
        try:
            outputs = self.model.base_model(input_ids=input_ids, **kwargs)
            hidden = outputs[0]
            if shift_labels is None:  # position t predicts token t + 1, as transformers' causal LM loss
                shift_labels = nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
            self.check_gradient_paths((hidden,))
            head = self.model.get_submodule(self.layout.head)
            loss = self.dfa.linear_cross_entropy(hidden, head, shift_labels.to(hidden.device), IGNORE_INDEX)
        except BaseException:
            self.dfa.discard_points()
            raise
        if num_items is not None:  # a sum over the tokens of several micro-batches, as transformers does
            loss = loss * (shift_labels != IGNORE_INDEX).sum() / num_items
        outputs_cls = require_transformers().modeling_outputs.CausalLMOutputWithPast
        fields = {f.name for f in dataclasses.fields(outputs_cls)} - {"loss", "logits"}
        return outputs_cls(loss=loss, logits=None, **{k: v for k, v in outputs.items() if k in fields})

    # ------------------------------------------------------------ saving and loading
    def dfa_config(self) -> dict:
        """What `save_pretrained` writes under "dfa" in config.json."""
        d = self.dfa
        error_dtype = d.error_dtype if d.error_dtype in (None, "auto") else str(d.error_dtype).removeprefix("torch.")
        return {
            "placement": self.placement,
            "error_at": self.error_at,
            "mode": d.mode,
            "seed": d.seed,
            "distribution": d.distribution,
            "layout": d.layout,
            "density": d.density,
            "scale": d.scale,
            "storage": d.storage,
            "backend": d.backend,
            "batch_dims": d.batch_dims,
            "check_finite": d.check_finite,
            "error_dtype": error_dtype,
            "spec": None if d.spec is None else d.spec.state(),
        }

    def save_pretrained(self, save_directory, **kwargs):
        """transformers' save_pretrained, plus the DFA settings (and spec) in config.json."""
        self.model.config.dfa = self.dfa_config()
        return self.model.save_pretrained(save_directory, **kwargs)

    @classmethod
    def from_pretrained(
        cls, path, placement: str | None = None, error_at: str | None = None, **kwargs
    ) -> DFAForCausalLM:
        """Load a model saved by :meth:`save_pretrained` (the same DFA, spec included), or convert a
        plain transformers checkpoint (``placement``/``error_at`` default to "macro"/"hidden").
        Keywords that :class:`dk.DFA` takes override the saved ones; the rest go to
        ``AutoModelForCausalLM.from_pretrained`` (e.g. ``torch_dtype``)."""
        transformers = require_transformers()
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in inspect.signature(DFA).parameters}
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
        saved = getattr(model.config, "dfa", None) or {}
        known = set(inspect.signature(DFA).parameters) | {"placement", "error_at", "spec"}
        if not isinstance(saved, dict) or set(saved) - known:
            got = sorted(set(saved) - known) if isinstance(saved, dict) else repr(saved)
            raise ValueError(
                f"{path}: config.json's 'dfa' entry must be a dict with keys among {sorted(known)} (as "
                f"save_pretrained writes it); got {got}"
            )
        saved = dict(saved)
        spec = saved.pop("spec", None)
        placement, error_at = placement or saved.pop("placement", "macro"), error_at or saved.pop("error_at", "hidden")
        saved.pop("placement", None), saved.pop("error_at", None)
        if isinstance(saved.get("error_dtype"), str) and saved["error_dtype"] != "auto":
            saved["error_dtype"] = getattr(torch, saved["error_dtype"])
        converted = convert(model, placement, error_at, inplace=True, **{**saved, **overrides})
        if spec is not None and not {"seed", "distribution", "layout", "density"} & set(overrides):
            converted.dfa.spec = FeedbackSpec.from_state(spec)  # the saved widths, checked at the first forward
        return converted

    def extra_repr(self) -> str:
        return f"placement={self.placement!r}, error_at={self.error_at!r}, " + super().extra_repr()
