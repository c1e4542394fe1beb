"""The random-feedback family as one method space: signal x matrix x where it enters (DESIGN.md §9).

A training method is three independent choices, and every ``mode`` of :class:`dk.DFA` and
``dk.convert`` is one point of that space (:data:`METHODS`):

- **signal**, what travels back: ``exact`` (backprop), ``none`` (shallow), ``error`` (e = dL/dy),
  ``sign`` (sign(e)), ``ternary`` (e quantized to {-1, 0, +1}), ``target`` (the one-hot class target).
- **matrix**, what carries it: ``random`` (fixed, a hash of (seed, i, j), never stored), ``learned``
  (materialized and trained, Kolen-Pollack), ``jacobian`` (materialized, an estimate of the output's
  Jacobian from forward-mode directional derivatives), or derived from the layer's weight W: ``sign_uniform`` σ·sign(W),
  ``sign_redrawn`` |R_t|∘sign(W), ``sign_fixed`` |B|∘sign(W).
- **entry**, where it enters: ``direct`` (one projection from the output to every feedback point,
  the DFA family: :mod:`dfa_kernels.autograd`) or ``layerwise`` (each nn.Linear/nn.Conv2d's input
  gradient uses a matrix in place of W^T, the FA family: :mod:`dfa_kernels.layerwise`).

Update rules, as implemented (e = dL/dy flattened to [N, K]; h_l a feedback point [N, d_l];
B_l its effective matrix [K, d_l], scale applied; g a layer's output gradient, x its input):

Direct (a point's gradient; the layers after the last point get their exact gradient):
- ``dfa`` (Nøkland 2016): grad(h_l) = e @ B_l.
- ``sdfa`` (sign-DFA, Frenkel et al. 2021's code): grad(h_l) = sign(e) @ B_l. With a softmax and
  cross-entropy sign(e) = sign(softmax(y) - onehot), the reference's form. sign(e) does not carry the
  loss's 1/N (mean reduction): as in the reference, the points' signal is per sample.
- ``drtp`` (Direct Random Target Projection, Frenkel, Lefebvre & Bol 2021): grad(h_l) = onehot(t) @ B_l,
  the class target, no error at all (the reference's sign convention: +onehot). Needs class targets:
  ``dfa(y, target=t)`` or ``dfa.targets(t)`` before the forward; negative classes (ignore_index) send 0.
- ``ternary`` (an optical co-processor's error, LightOn): grad(h_l) = q(e) @ B_l with
  q(e)_ij = sign(e_ij) where |e_ij| >= threshold * max_j |e_ij| (per row), else 0. LightOn has not
  published its exact rule: this per-row relative threshold (``threshold=``, default 0.1) is ours;
  threshold 0 is sign(e), i.e. ``sdfa``.
- ``dkp`` (Direct Kolen-Pollack, Webster, Choe & Kim 2021): grad(h_l) = e @ B_l with B_l a parameter
  (initialised to dfa's effective B_l), whose gradient is grad(B_l) = e^T h_l (the layer's activity:
  f(a) for a fused point), so the optimizer moves B_l as the output layer's weight would move
  (Kolen-Pollack); the reference steps B with its own optimizer (Adam, weight decay 1e-6).
- ``fdfa`` (Forward DFA, Bacho & Chu 2023): grad(h_l) = e @ B_l with B_l a parameter, initialised to
  zero as in the reference, that estimates the Jacobian dy/dh_l of the output y w.r.t. the point. Each
  training forward runs in forward-mode AD (dual tensors): every point adds a fresh perturbation
  u_l ~ N(0, I) to the tangent it passes on, so y's tangent is d = sum_k J_k u_k, and
  grad(B_l) = B_l - mean over rows of d^T u_l (an unbiased estimate of J_l: E[u_k u_l^T] = 0 for
  k != l). With SGD at rate a that is the paper's momentum average B_l <- (1 - a) B_l + a d^T u_l;
  the reference (and the zoo) step it with an optimizer of their own choice (Adam there). It costs a
  forward-mode pass (about one more forward) and needs every op between the points and y to have a
  forward-mode derivative (PyTorch's own ops do).

Layer-wise (grad(W) = g^T x and grad(b) = sum g stay exact; only grad(x) changes):
- ``fa`` (Lillicrap et al. 2016): grad(x) = g @ B, B fixed random of W's shape from the hash;
  for convolutions grad(x) = conv2d_input(B, g).
- ``usf`` (uniform sign-concordant, Liao, Leibo & Poggio 2016): B = σ·sign(W).
- ``brsf`` (batchwise random-magnitude sign-concordant): B = |R_t|∘sign(W), R_t redrawn each step.
- ``frsf`` (fixed random-magnitude sign-concordant): B = |R|∘sign(W), R fixed.
  R has the spread of the layer's initialisation (``init="xavier"``: Xavier-uniform, biotorch's
  default; ``"kaiming"``: PyTorch's default Linear init), and σ is that init's standard deviation,
  sqrt(2 / (fan_in + fan_out)) for Xavier, as in biotorch and Xiao et al. 2018.
"""

from __future__ import annotations

import dataclasses

import torch

SIGNALS = ("exact", "none", "error", "sign", "ternary", "target")
MATRICES = ("random", "learned", "jacobian", "sign_uniform", "sign_redrawn", "sign_fixed")
ENTRIES = ("direct", "layerwise")


@dataclasses.dataclass(frozen=True)
class Method:
    """One point of the method space. `matrix` and `entry` are None for bp and shallow."""

    name: str
    signal: str
    matrix: str | None
    entry: str | None
    reference: str

    def __post_init__(self) -> None:
        assert self.signal in SIGNALS and self.matrix in MATRICES + (None,) and self.entry in ENTRIES + (None,)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("dfa", "error", "random", "direct", "Nøkland 2016"),
        Method("bp", "exact", None, None, "backpropagation: exact gradients through the same model"),
        Method("shallow", "none", None, None, "only the layers after the last point learn"),
        Method("sdfa", "sign", "random", "direct", "Frenkel, Lefebvre & Bol 2021 (sDFA)"),
        Method("drtp", "target", "random", "direct", "Frenkel, Lefebvre & Bol 2021 (DRTP)"),
        Method("ternary", "ternary", "random", "direct", "LightOn optical DFA (rule not published: ours)"),
        Method("dkp", "error", "learned", "direct", "Webster, Choe & Kim 2021 (Direct Kolen-Pollack)"),
        Method("fdfa", "error", "jacobian", "direct", "Bacho & Chu 2023 (Forward Direct Feedback Alignment)"),
        Method("fa", "error", "random", "layerwise", "Lillicrap et al. 2016"),
        Method("usf", "error", "sign_uniform", "layerwise", "Liao, Leibo & Poggio 2016 (uSF)"),
        Method("brsf", "error", "sign_redrawn", "layerwise", "Liao, Leibo & Poggio 2016; Xiao et al. 2018 (brSF)"),
        Method("frsf", "error", "sign_fixed", "layerwise", "Liao, Leibo & Poggio 2016; Xiao et al. 2018 (frSF)"),
    )
}
MODES: tuple[str, ...] = tuple(METHODS)
DIRECT: tuple[str, ...] = tuple(n for n, m in METHODS.items() if m.entry == "direct")
LAYERWISE: tuple[str, ...] = tuple(n for n, m in METHODS.items() if m.entry == "layerwise")


def method(mode: str) -> Method:
    """The :class:`Method` named `mode`; a ValueError lists the modes otherwise."""
    if mode not in METHODS:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}; got {mode!r}")
    return METHODS[mode]


def learns_matrix(mode: str) -> bool:
    """Whether the mode's B is a materialized parameter that trains (dkp, fdfa)."""
    return METHODS[mode].matrix in ("learned", "jacobian")


def passes_gradients(mode: str) -> bool:
    """Whether the points let gradients through (no detach): exact gradients, or layer-wise
    methods, whose signal travels down layer by layer through the model's own graph."""
    return mode == "bp" or mode in LAYERWISE


def check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(
            f"threshold (mode 'ternary': entries below threshold * the row's largest |e| send 0) "
            f"must be a number in [0, 1]; got {threshold!r}"
        )
    return float(threshold)


def ternarize(e: torch.Tensor, threshold: float) -> torch.Tensor:
    """q(e)_ij = sign(e_ij) where |e_ij| >= threshold * max_j |e_ij|, else 0 (rows of e [N, K])."""
    magnitude = e.abs()
    keep = magnitude >= threshold * magnitude.amax(dim=1, keepdim=True)
    return torch.where(keep, torch.sign(e), torch.zeros((), dtype=e.dtype, device=e.device))


def one_hot(target: torch.Tensor, classes: int, dtype: torch.dtype) -> torch.Tensor:
    """[N, classes] rows of the class indices `target` [N]; a negative index (ignore_index) gives 0."""
    valid = target >= 0
    hot = torch.nn.functional.one_hot(torch.where(valid, target, 0), classes).to(dtype)
    return hot * valid.unsqueeze(1).to(dtype)


def direct_signal(signal: str, e: torch.Tensor, target: torch.Tensor | None, threshold: float) -> torch.Tensor:
    """What a direct method projects, from the error e [N, K] (and the targets: class indices [N],
    or a float tensor [N, K] used as is)."""
    if signal == "error":
        return e
    if signal == "sign":
        return torch.sign(e)
    if signal == "ternary":
        return ternarize(e, threshold)
    if signal == "target":
        if target is None:
            raise ValueError(
                "signal 'target' (mode 'drtp') projects the class targets: target must be a tensor "
                "of class indices [N] or a float tensor [N, K]; got None"
            )
        if target.is_floating_point():
            return target.to(e.dtype)
        return one_hot(target, e.shape[1], e.dtype)
    raise ValueError(f"signal {signal!r} is not projected by a direct method")
