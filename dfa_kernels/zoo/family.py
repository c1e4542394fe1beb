"""A zoo run in any method of the random-feedback family (:mod:`dfa_kernels.methods`).

Recipes build their model with ``dk.DFA(mode=config.mode)`` and its points, as for dfa; what a
family method needs beyond that is added here, once for every recipe (``tasks.register`` wraps
each task's build with :func:`prepare`):

- layer-wise methods (fa, usf, brsf, frsf): every ``nn.Linear``, ``nn.Conv2d`` and PyG ``Linear``
  of the model becomes a FeedbackLinear/FeedbackConv2d reading the DFA module's mode (with several
  DFA modules, as NeRF's coarse and fine networks, each one's parent module's layers read it)
  (``convert_layers``, parameters shared, so the optimizer built by the recipe still holds them).
  A model whose other weight layers would keep exact gradients (GAT's attention vectors, say) is
  refused: its run would be a hybrid of backprop and feedback alignment, not the method.
- drtp projects the class targets: the run's ``targets(batch)`` (class indices, -1 for rows that
  do not train, or a float tensor shaped like the output) reaches ``dfa.targets`` before every
  training forward; a run without class targets (regression) is refused.
- dkp and fdfa learn their feedback matrices, which a DFA module creates at its first forward: one
  forward (eval mode, no gradient, RNG and batch stream restored) creates them, and they join the
  recipe's optimizer as their own group, at its first group's learning rate, with weight decay
  1e-6 for dkp (its reference steps B with Adam and weight decay 1e-6) and none for fdfa (its
  reference's default feedback decay is 0).
"""

from __future__ import annotations

import torch
from torch import nn

import dfa_kernels as dk
from dfa_kernels import methods
from dfa_kernels.convert import convert_layers
from dfa_kernels.layerwise import FeedbackConv2d, FeedbackLinear

# layers whose weights no method gives a feedback matrix: looked up by a table or a scale, not a product
_NOT_PROJECTING = (nn.Embedding, nn.EmbeddingBag, nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)


def dfa_modules(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, dk.DFA)]


def prepare(run, mode: str):
    """`run` (built by a recipe for `mode`) made to train by `mode`; see the module docstring."""
    method = methods.method(mode)
    dfas = dfa_modules(run.model)
    if mode in methods.LAYERWISE:
        for owner, dfa in _owners(run.model, dfas, mode):
            convert_layers(owner, dfa)
        hybrid = [
            name
            for name, m in run.model.named_modules()
            if not isinstance(m, (FeedbackLinear, FeedbackConv2d, *_NOT_PROJECTING))
            and any(p.dim() >= 2 for p in m.parameters(recurse=False))
        ]
        if hybrid:
            raise ValueError(
                f"mode {mode!r} gives every nn.Linear and nn.Conv2d a feedback matrix, but this model's "
                f"layers {hybrid} are of other types and would keep exact gradients (a hybrid, not the "
                "method)"
            )
        run.hyper_parameters["layers_converted"] = sum(
            isinstance(m, (FeedbackLinear, FeedbackConv2d)) for m in run.model.modules()
        )
    if method.signal == "target":
        if run.targets is None:
            raise ValueError(
                f"mode {mode!r} projects the one-hot class target, and this task has no class targets "
                "(a regression or ranking loss): use another mode"
            )
        loss, targets = run.loss, run.targets

        def loss_with_targets(model, batch):
            t = targets(batch)
            for dfa in dfa_modules(model):
                dfa.targets(t)
            return loss(model, batch)

        run.loss = loss_with_targets
    if methods.learns_matrix(mode):
        _add_learned_matrices(run, dfas, mode)
    return run


def _owners(model: nn.Module, dfas: list, mode: str) -> list[tuple[nn.Module, dk.DFA]]:
    """(module, its DFA) pairs whose layers a layer-wise mode converts: the whole model for one DFA
    module; for several (NeRF's coarse and fine networks), each DFA's parent, which must not hold
    another's (their layers would read two modes' seeds)."""
    if not dfas:
        raise ValueError(f"mode {mode!r}: the model holds no dk.DFA module (whose mode its layers read)")
    if len(dfas) == 1:
        return [(model, dfas[0])]
    parents = [next(p for p in model.modules() if any(c is dfa for c in p.children())) for dfa in dfas]
    for parent in parents:
        inside = [d for d in dfa_modules(parent) if all(d is not x for x in parent.children())]
        if inside:
            raise ValueError(
                f"mode {mode!r}: a {type(parent).__name__} holding a dk.DFA module holds another one inside "
                "a submodule: which one its layers read is ambiguous"
            )
    return list(zip(parents, dfas))


FEEDBACK_DECAY = {"dkp": 1e-6, "fdfa": 0.0}  # the references' weight decay on B


def _add_learned_matrices(run, dfas: list, mode: str) -> None:
    position = run.batches.state_dict()
    batch = next(run.batches)
    run.batches.load_state_dict(position)
    training = run.model.training
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        run.model.eval()
        run.loss(run.model, batch)
    run.model.train(training)
    learned = [d.feedback for d in dfas if d.feedback is not None]
    if len(learned) != len(dfas):
        raise RuntimeError(f"mode {mode!r}: a forward pass did not create every DFA module's learned matrix")
    decay = FEEDBACK_DECAY[mode]
    run.optimizer.add_param_group({"params": learned, "lr": run.optimizer.param_groups[0]["lr"], "weight_decay": decay})
    _follow_first_groups_schedule(run)
    run.hyper_parameters["feedback_optimizer"] = (
        f"the recipe's optimizer, own group: first group's lr and schedule, weight decay {decay:g}"
    )


def _follow_first_groups_schedule(run) -> None:
    """The group just added follows the first group's schedule: a LambdaLR built before it existed
    holds one base rate and one factor per group it saw (ReduceLROnPlateau adapts by itself)."""
    scheduler = run.scheduler
    if scheduler is None:
        return
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise TypeError(f"cannot extend a {type(scheduler).__name__} to the learned matrices' group")
    group, factor = run.optimizer.param_groups[-1], scheduler.lr_lambdas[0]
    group["initial_lr"] = run.optimizer.param_groups[0]["initial_lr"]  # group 0's lr is already scaled
    scheduler.base_lrs.append(group["initial_lr"])
    scheduler.lr_lambdas.append(factor)
    group["lr"] = group["initial_lr"] * factor(scheduler.last_epoch)
