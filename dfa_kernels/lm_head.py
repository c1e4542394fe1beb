"""Fused linear + cross-entropy: the loss of ``hidden @ W^T + b`` without the [N, vocab] logits.

Memory: a plain LM head holds the logits [N, V] and their gradient [N, V] (fp32: 8 N V bytes; for
N = 8 x 2048 tokens and V = 50257 that is 6.6 GB). Here the rows go in chunks of C: the chunk's
logits are computed into one fp32 [C, V] buffer, turned in place into the loss and its gradient
g = dL/dlogits (softmax - one-hot, divided by the number of counted rows), and g is consumed at
once: grad_hidden[chunk] = g @ W, grad_W += g^T hidden[chunk], grad_b += sum(g), and the caller's
``on_chunk`` (DFA projects g to every feedback point there). Peak extra memory: 4 C V bytes.
C defaults to the rows that fit in 256 MiB on a GPU (32 MiB on a CPU).

Since the gradients are known once the loss is, they are computed in the forward pass and only
scaled by the incoming gradient in backward, as fused linear-cross-entropy kernels do for BP.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("dfa_kernels")

CHUNK_BYTES = {"cuda": 256 << 20, "cpu": 32 << 20}


def default_chunk_rows(N: int, vocab: int, device) -> int:
    budget = CHUNK_BYTES.get(torch.device(device).type, CHUNK_BYTES["cpu"])
    return max(1, min(N, budget // (4 * max(vocab, 1))))


def resolve_ce_backend(backend: str, device) -> str:
    """ "triton" (the in-place softmax/gradient kernel) or "torch" (torch ops) for the per-chunk
    loss. "auto" takes Triton on a GPU; the projection backends "cpu"/"cuda" use torch ops here."""
    from . import triton as dk_triton

    device = torch.device(device)
    if backend == "triton" or (backend == "auto" and device.type == "cuda"):
        if dk_triton.is_available(device.type):
            return "triton"
        if backend == "triton":
            raise RuntimeError(f"backend 'triton' cannot run the cross-entropy kernel on {device}")
    return "torch"


def _check(hidden, weight, target, bias, ignore_index):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2 or not hidden.is_floating_point():
        raise ValueError(
            f"hidden must be a float tensor [N, d]; got {getattr(hidden, 'dtype', type(hidden))} "
            f"{tuple(getattr(hidden, 'shape', ()))}"
        )
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must be [vocab, d = {hidden.shape[1]}] (an nn.Linear's weight); got "
            f"{tuple(getattr(weight, 'shape', ()))}"
        )
    if not isinstance(target, torch.Tensor) or target.shape != hidden.shape[:1] or target.dtype != torch.int64:
        raise ValueError(
            f"target must be an int64 tensor [N = {hidden.shape[0]}] of class indices; got "
            f"{getattr(target, 'dtype', type(target))} {tuple(getattr(target, 'shape', ()))}"
        )
    if bias is not None and (bias.shape != weight.shape[:1]):
        raise ValueError(f"bias must be [vocab = {weight.shape[0]}]; got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("target", target), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    # Checked on the device (no sync): a RuntimeError on a CPU, a device-side assert on a GPU (as
    # F.cross_entropy's own check).
    in_range = ((target >= 0) & (target < weight.shape[0])) | (target == ignore_index)
    torch._assert_async(
        in_range.all(),
        f"linear_cross_entropy: target holds class indices outside [0, vocab = "
        f"{weight.shape[0]}) (ignore_index={ignore_index} marks rows to skip)",
    )


def _ce_grad_torch(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, inv_count: torch.Tensor
) -> torch.Tensor:
    """Per-row losses; logits [C, V] fp32 is overwritten with the gradient (softmax - onehot) * inv_count
    (a 0-dim fp32 tensor on logits' device)."""
    valid = target != ignore_index
    safe = torch.where(valid, target, 0)
    lse = torch.logsumexp(logits, dim=1)
    losses = (lse - logits.gather(1, safe[:, None]).squeeze(1)) * valid
    logits.sub_(lse[:, None]).exp_()
    rows = torch.arange(logits.shape[0], device=logits.device)
    logits[rows, safe] -= 1.0
    logits.mul_((valid.to(torch.float32) * inv_count)[:, None])
    return losses


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
    on_chunk=None,
    backend: str = "auto",
):
    """(loss, grad_hidden, grad_weight, grad_bias) of ``F.cross_entropy(hidden @ weight.T + bias, target)``
    (mean over rows whose target is not ignore_index), chunk by chunk; see the module docstring.

    on_chunk(start, stop, g): called with each chunk's dL/dlogits [stop - start, vocab] (fp32); the
    buffer is reused afterwards, so the callee consumes it at once. grad_bias is None without a bias.
    With every row ignored the loss is NaN, as F.cross_entropy's.
    """
    _check(hidden, weight, target, bias, ignore_index)
    # The precision is chosen below; an enclosing autocast would recast the out= products.
    with torch.autocast(hidden.device.type, enabled=False):
        return _chunks(hidden, weight, target, bias, ignore_index, chunk_rows, on_chunk, backend)


def _chunks(hidden, weight, target, bias, ignore_index, chunk_rows, on_chunk, backend):
    N, V = hidden.shape[0], weight.shape[0]
    chunk = default_chunk_rows(N, V, hidden.device) if chunk_rows is None else int(chunk_rows)
    if chunk < 1:
        raise ValueError(f"chunk_rows must be a positive int; got {chunk_rows!r}")
    ce_backend = resolve_ce_backend(backend, hidden.device)
    log.debug(
        "dfa_kernels: linear_cross_entropy on %s, %d rows per chunk, cross-entropy by %s",
        hidden.device,
        chunk,
        ce_backend,
    )
    # The number of counted rows stays on the device (reading it would be a sync).
    count = (target != ignore_index).sum()
    inv_count = 1.0 / count.clamp(min=1).to(torch.float32)
    # 16-bit products in their own dtype on a GPU (tensor cores, fp32 accumulation); fp32 elsewhere.
    compute = hidden.dtype if hidden.is_cuda else torch.float32
    w = weight.to(compute)
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros(V, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    grad_bias = None if bias is None else torch.zeros(V, dtype=torch.float32, device=hidden.device)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    buffer = torch.empty(min(chunk, N), V, dtype=torch.float32, device=hidden.device)
    for start in range(0, N, chunk):
        stop = min(N, start + chunk)
        h = hidden[start:stop].to(compute)
        g = buffer[: stop - start]
        if compute == torch.float32:
            torch.mm(h, w.T, out=g)
        else:
            g.copy_(h @ w.T)
        if bias is not None:
            g += bias.to(torch.float32)
        if ce_backend == "triton":
            from .triton.cross_entropy import cross_entropy_grad_

            losses = cross_entropy_grad_(g, target[start:stop], ignore_index, inv_count)
        else:
            losses = _ce_grad_torch(g, target[start:stop], ignore_index, inv_count)
        loss += losses.sum()
        if on_chunk is not None:
            on_chunk(start, stop, g)
        gc = g.to(compute)
        grad_hidden[start:stop] = (gc @ w).to(hidden.dtype)
        grad_weight += gc.T @ h  # per chunk in the compute dtype (as autocast's BP), summed in fp32
        if grad_bias is not None:
            grad_bias += g.sum(0)
    loss = torch.where(count > 0, loss * inv_count, float("nan"))
    return (loss, grad_hidden, grad_weight.to(weight.dtype), None if grad_bias is None else grad_bias.to(bias.dtype))


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index, chunk_rows, backend):
        loss, gh, gw, gb = chunked_linear_cross_entropy(
            hidden, weight, target, bias, ignore_index=ignore_index, chunk_rows=chunk_rows, backend=backend
        )
        ctx.save_for_backward(gh, gw, gb)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        gh, gw, gb = ctx.saved_tensors
        return gh * grad_loss, gw * grad_loss, None if gb is None else gb * grad_loss, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), target)`` (mean) without [N, vocab] logits.

    hidden: [*batch, d], target: [*batch]; differentiable in hidden, weight and bias.
    """
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = target.reshape(-1)
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        with torch.no_grad():
            return chunked_linear_cross_entropy(
                h2, weight, t1, bias, ignore_index=ignore_index, chunk_rows=chunk_rows, backend=backend
            )[0]
    return LinearCrossEntropy.apply(h2, weight, bias, t1, ignore_index, chunk_rows, backend)
