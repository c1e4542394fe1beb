"""Fused linear + cross-entropy (dfa_kernels.lm_head) and the DFA error after a vocabulary head
(DFA.linear_cross_entropy), against torch's F.linear + F.cross_entropy with autograd."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfa_kernels as dk
from dfa_kernels import lm_head
from dfa_kernels import triton as dk_triton

CE_BACKENDS = ["torch"] + (["triton"] if dk_triton.is_available("cpu") else [])


def _reference(h, W, b, t):
    h, W = h.detach().float().requires_grad_(), W.detach().float().requires_grad_()
    b = None if b is None else b.detach().float().requires_grad_()
    logits = F.linear(h, W, b).requires_grad_()
    loss = F.cross_entropy(logits, t)
    wrt = [logits, h, W] + ([b] if b is not None else [])
    return loss, torch.autograd.grad(loss, wrt)


@pytest.mark.parametrize("backend", CE_BACKENDS)
@pytest.mark.parametrize("N,V,d,chunk", [(1, 5, 3, None), (7, 257, 9, 3), (130, 1000, 33, 64)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_chunked_matches_torch(backend, N, V, d, chunk, with_bias):
    h, W = torch.randn(N, d), torch.randn(V, d) * 0.3
    b = torch.randn(V) if with_bias else None
    t = torch.randint(0, V, (N,))
    t[1::3] = -100  # ignored rows
    if N == 1:
        t[0] = 2
    loss, (g_logits, gh, gW, *gb) = _reference(h, W, b, t)
    chunks = []
    got, got_h, got_W, got_b = lm_head.chunked_linear_cross_entropy(
        h, W, t, b, chunk_rows=chunk, backend=backend, on_chunk=lambda s, e, g: chunks.append((s, e, g.clone()))
    )
    torch.testing.assert_close(got, loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_h, gh, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_W, gW, atol=1e-5, rtol=1e-4)
    if with_bias:
        torch.testing.assert_close(got_b, gb[0], atol=1e-5, rtol=1e-4)
    else:
        assert got_b is None
    # the chunks tile the rows in order, and together they are dL/dlogits
    assert [s for s, _, _ in chunks] == list(range(0, N, chunk or N))
    torch.testing.assert_close(torch.cat([g for _, _, g in chunks]), g_logits, atol=1e-6, rtol=1e-5)


def test_under_autocast_matches_fp32_reference():
    """An enclosing autocast does not recast the chunked products (the head chooses its precision)."""
    h, W, t = torch.randn(40, 16).bfloat16(), torch.randn(100, 16) * 0.3, torch.randint(0, 100, (40,))
    loss, (_, gh, gW) = _reference(h, W, None, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_h, got_W, _ = lm_head.chunked_linear_cross_entropy(h, W, t, chunk_rows=16)
    torch.testing.assert_close(got, loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_h, gh.bfloat16(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got_W, gW, atol=1e-5, rtol=1e-4)


def test_chunk_buffer_is_bounded():
    # the rule: at most CHUNK_BYTES of fp32 logits per chunk, never N x V
    assert lm_head.default_chunk_rows(10**6, 50257, "cpu") * 50257 * 4 <= lm_head.CHUNK_BYTES["cpu"]
    assert lm_head.default_chunk_rows(10**6, 50257, "cuda") * 50257 * 4 <= lm_head.CHUNK_BYTES["cuda"]
    assert lm_head.default_chunk_rows(3, 10, "cpu") == 3
    sizes = []
    lm_head.chunked_linear_cross_entropy(
        torch.randn(50, 4),
        torch.randn(11, 4),
        torch.randint(0, 11, (50,)),
        chunk_rows=8,
        on_chunk=lambda s, e, g: sizes.append(g.shape),
    )
    assert max(s[0] for s in sizes) == 8 and all(s[1] == 11 for s in sizes)


def test_all_rows_ignored_and_bad_input():
    loss = lm_head.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.full((3,), -100))
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(torch.randn(3, 5), torch.full((3,), -100)))
    with pytest.raises(ValueError, match=r"weight must be \[vocab, d = 4\]"):
        lm_head.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="target must be an int64 tensor"):
        lm_head.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3))
    # checked on the device (no sync): a RuntimeError on a CPU, a device-side assert on a GPU
    with pytest.raises(RuntimeError, match=r"target holds class indices outside \[0, vocab = 5\)"):
        lm_head.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 5, 1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_autograd_function_with_batch_dims(dtype):
    h = torch.randn(2, 5, 8).to(dtype).requires_grad_()
    head = nn.Linear(8, 37).to(dtype)
    t = torch.randint(0, 37, (2, 5))
    loss = lm_head.linear_cross_entropy(h, head.weight, t, head.bias, chunk_rows=3)
    loss.backward()
    ref_loss, (_, gh, gW, gb) = _reference(h.reshape(-1, 8), head.weight, head.bias, t.reshape(-1))
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(loss.float(), ref_loss, **tol)
    torch.testing.assert_close(h.grad.float().reshape(-1, 8), gh, **tol)
    torch.testing.assert_close(head.weight.grad.float(), gW, **tol)
    torch.testing.assert_close(head.bias.grad.float(), gb, **tol)


class TinyLM(nn.Module):
    def __init__(self, mode, form):
        super().__init__()
        self.embed, self.l1, self.l2 = nn.Embedding(13, 8), nn.Linear(8, 16), nn.Linear(16, 8)
        self.head = nn.Linear(8, 29)
        self.dfa, self.form = dk.DFA(mode=mode, seed=4), form

    def loss(self, tokens, targets):
        x = self.dfa.linear(self.embed(tokens), self.l1, "gelu")
        h = self.dfa.point(torch.tanh(self.l2(x)))
        if self.form == "fused":
            return self.dfa.linear_cross_entropy(h, self.head, targets)
        logits = self.dfa(self.head(h))
        return F.cross_entropy(logits.reshape(-1, 29), targets.reshape(-1))


@pytest.mark.parametrize("mode", ["dfa", "bp", "shallow"])
def test_dfa_error_after_head_without_logits(mode):
    """DFA.linear_cross_entropy gives every parameter the gradient dfa(head(h)) + F.cross_entropy gives."""
    tokens, targets = torch.randint(0, 13, (3, 7)), torch.randint(0, 29, (3, 7))
    torch.manual_seed(0)
    plain = TinyLM(mode, "logits")
    fused = TinyLM(mode, "fused")
    fused.load_state_dict(plain.state_dict())
    for model in (plain, fused):
        model.loss(tokens, targets).backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        if p.grad is None:
            assert q.grad is None, name
        else:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)
    assert fused.dfa.spec.out_features == 29  # the error is vocabulary-wide


def test_dfa_linear_cross_entropy_errors():
    dfa = dk.DFA()
    with pytest.raises(RuntimeError, match="no feedback point"):
        dfa.linear_cross_entropy(torch.randn(2, 4), nn.Linear(4, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="target must have shape"):
        dfa.linear_cross_entropy(torch.randn(2, 4), nn.Linear(4, 5), torch.zeros(3, dtype=torch.long))
