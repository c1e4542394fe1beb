"""Property-based tests (hypothesis): the projection on every backend available here against the
plain-PyTorch reference, over random shapes, seeds, distributions, layouts, dtypes and scales.

Examples are drawn deterministically (``derandomize=True``: the same cases on every run, so CI is
reproducible) and kept small (Triton runs under its interpreter on a CPU): the file takes well
under a minute. Set ``DFA_HYPOTHESIS_EXAMPLES`` to draw more (e.g. 500) when exploring.
"""

import math
import os

import pytest
import torch
from conftest import backend_device_pairs

import dfa_kernels as dk
from dfa_kernels import ops, reference

hypothesis = pytest.importorskip("hypothesis", reason='needs the test extra: pip install "dfa-kernels[test]"')
from hypothesis import assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("DFA_HYPOTHESIS_EXAMPLES", "25"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)
BACKENDS = backend_device_pairs()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative error allowed on |F| ~ sqrt(out_features) (as tests/test_project.py): 16-bit paths may
# round B to the input dtype; the output's own rounding is the rtol.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@st.composite
def problems(draw):
    """A projection problem: backend, device, spec, error e, storage, scale, output dtype."""
    backend, device = draw(st.sampled_from(BACKENDS))
    interpreted = backend == "triton" and device == "cpu"
    dtype = draw(st.sampled_from(DTYPES[:2] if interpreted else DTYPES))  # the interpreter's bf16 dot is wrong
    # narrow (outer-product paths), mid and vocabulary-like error widths; a few points of any width
    out_features = draw(st.one_of(st.integers(1, 20), st.integers(21, 300), st.sampled_from([1024, 4099])))
    widths = draw(st.lists(st.integers(1, 300), min_size=1, max_size=4))
    N = draw(st.integers(0, 70))
    assume(not interpreted or N * out_features * sum(widths) <= 300_000)  # interpreter: keep it quick
    spec = dk.FeedbackSpec(
        out_features,
        widths,
        seed=draw(st.integers(0, 2**32 - 1)),
        distribution=draw(st.sampled_from(dk.DISTRIBUTIONS)),
        layout=draw(st.sampled_from(dk.LAYOUTS)),
        density=draw(st.floats(0.01, 1.0)),
    )
    e_seed = draw(st.integers(0, 2**16))
    e = (
        torch.randn(N, out_features, generator=torch.Generator().manual_seed(e_seed))
        * draw(st.sampled_from([1e-3, 1.0, 30.0]))
    ).to(device=device, dtype=dtype)
    storage = draw(st.sampled_from(["virtual", "materialized"]))
    scale = draw(st.floats(-4.0, 4.0, allow_nan=False).filter(lambda s: abs(s) > 1e-3))
    out_dtype = draw(st.sampled_from([None, torch.float32, torch.float16, torch.bfloat16]))
    if interpreted and out_dtype == torch.bfloat16:
        out_dtype = None
    return backend, device, spec, e, storage, scale, out_dtype


def _bound(e, spec, dtype, scale):
    emax = max(float(e.abs().max()), 1e-30) if e.numel() else 1.0
    return TOL[dtype] * math.sqrt(spec.out_features) * abs(scale) * emax


def _close(got, want, atol, out_dtype, in_dtype):
    rtol = max(TOL[in_dtype], TOL[out_dtype])
    atol = max(atol, float(want.abs().max()) * TOL[out_dtype] if want.numel() else 0.0)
    if want.numel() and torch.isinf(want).any():  # beyond the 16-bit output's range: both overflow alike
        assert torch.equal(torch.isinf(got.float().cpu()), torch.isinf(want))
        finite = torch.isfinite(want)
        got, want = got.float().cpu()[finite], want[finite]
    torch.testing.assert_close(got.float().cpu(), want, atol=atol, rtol=rtol)


@SETTINGS
@given(problems())
def test_project_matches_the_reference(problem):
    backend, device, spec, e, storage, scale, out_dtype = problem
    got = dk.project(e, spec, storage=storage, backend=backend, scale=scale, out_dtype=out_dtype)
    target = out_dtype or e.dtype
    assert got.shape == (e.shape[0], spec.total_width) and got.dtype == target and got.device == e.device
    B = reference.feedback_matrix(spec.seed, spec.distribution, spec.out_features, spec.total_width, spec.density)
    want = reference.project_materialized(e.cpu(), B, scale, None, torch.float32).to(target).float()
    _close(got, want, _bound(e, spec, e.dtype, scale), target, e.dtype)


@SETTINGS
@given(problems(), st.lists(st.sampled_from(reference.ACTIVATIONS), min_size=4, max_size=4))
def test_project_points_matches_the_reference(problem, activations):
    backend, device, spec, e, storage, scale, out_dtype = problem
    count = len(spec.widths)
    activations = activations[:count]
    g = torch.Generator().manual_seed(spec.seed % 1000)
    acts = [
        None if a == "none" else torch.randn(e.shape[0], w, generator=g).to(device=device, dtype=e.dtype)
        for w, a in zip(spec.widths, activations)
    ]
    scales = [scale * (l + 1) for l in range(count)]
    got = ops.project_points(
        e, spec, storage, backend, scales=scales, act_inputs=acts, activations=activations, out_dtype=out_dtype
    )
    target = out_dtype or e.dtype
    want = reference.project_points(
        e.cpu(),
        None,
        spec.seed,
        spec.distribution,
        spec.density,
        spec.offsets,
        spec.widths,
        scales,
        [None if a is None else a.cpu() for a in acts],
        activations,
        torch.float32,
    )
    assert len(got) == count
    for l, (g_l, w_l) in enumerate(zip(got, want)):
        assert g_l.shape == (e.shape[0], spec.widths[l]) and g_l.dtype == target
        # f'(a) <= 1.13 (gelu), so the projection's bound holds for the product
        _close(g_l, w_l.to(target).float(), 1.2 * _bound(e, spec, e.dtype, scales[l]), target, e.dtype)


@SETTINGS
@given(
    st.sampled_from(BACKENDS),
    st.integers(1, 70),
    st.integers(1, 300),
    st.integers(0, 2**32 - 1),
    st.sampled_from(dk.DISTRIBUTIONS),
    st.floats(0.01, 1.0),
)
def test_feedback_matrix_matches_the_reference(backend_device, rows, cols, seed, distribution, density):
    """Uniform, Rademacher and sparse B are bit-identical on every backend; Gaussian to 1e-5."""
    backend, device = backend_device
    spec = dk.FeedbackSpec(rows, [cols], seed=seed, distribution=distribution, density=density)
    got = spec.matrix(device=device, backend=backend).cpu()
    want = reference.feedback_matrix(seed, distribution, rows, cols, density)
    if distribution == "gaussian":
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(got, want)
