"""The published test vectors of csrc/include/dfa_kernels/hash.h, on every backend."""

import re
from pathlib import Path

import pytest
import torch
from conftest import backend_device_pairs

import dfa_kernels as dk
from dfa_kernels import reference

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "include" / "dfa_kernels" / "hash.h"
VECTORS = [  # (seed, i, j, hash, uniform, rademacher, gaussian ~)
    (0, 0, 0, 0xDE727C7A, 0.7378687858581543, -1.0, -0.299004),
    (0, 0, 1, 0x35E68B34, -0.5789018869400024, 1.0, 1.689729),
    (0, 1, 0, 0x89D77FAA, 0.07688891887664795, -1.0, 0.936689),
    (1, 0, 0, 0xA5F47565, 0.29652273654937744, 1.0, 0.145733),
    (42, 3, 17, 0x63E4843A, -0.2195887565612793, -1.0, 0.303055),
    (123456789, 50256, 4095, 0x6C5DEE1B, -0.15338349342346191, -1.0, -0.746140),
    (4294967295, 7, 1000000, 0x8AA1670A, 0.08305060863494873, -1.0, -0.573929),
]


def _mix32_python(x):
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def _hash_python(seed, i, j):
    """hash.h's formulas with Python integers: an independent transcription."""
    m = 0xFFFFFFFF
    skey = _mix32_python(seed ^ 0x9E3779B9)
    rkey = _mix32_python((skey + i * 0x9E3779B9) & m)
    ckey = _mix32_python((j * 0x85EBCA6B + 0x632BE5AB) & m)
    return _mix32_python(rkey ^ ckey)


def test_vectors_are_published_in_the_header():
    text = HEADER.read_text()
    for seed, i, j, h, u, _, _ in VECTORS:
        assert re.search(rf"\({seed}, {i}, {j}\)\s+-> 0x{h:08x}", text), (seed, i, j)
        assert repr(u) in text


@pytest.mark.parametrize("seed,i,j,h,u,r,g", VECTORS)
def test_reference_hash_matches_vectors(seed, i, j, h, u, r, g):
    assert _hash_python(seed, i, j) == h
    assert int(reference.hash_ij(seed, torch.tensor(i), torch.tensor(j))) == h
    for dist, expected in (("uniform", u), ("rademacher", r)):
        assert reference.feedback_matrix(seed, dist, i + 1, 1, col_offset=j)[i, 0].item() == expected
    gauss = reference.feedback_matrix(seed, "gaussian", i + 1, 1, col_offset=j)[i, 0].item()
    assert gauss == pytest.approx(g, abs=1e-6)


@pytest.mark.parametrize("backend,device", backend_device_pairs())
@pytest.mark.parametrize("seed", [0, 1, 42, 2**32 - 1])
@pytest.mark.parametrize("distribution", dk.DISTRIBUTIONS)
def test_backends_generate_the_same_matrix(backend, device, seed, distribution):
    spec = dk.FeedbackSpec(out_features=37, widths=[33, 64, 7], seed=seed, distribution=distribution)
    got = spec.matrix(device=device, backend=backend).cpu()
    want = reference.feedback_matrix(seed, distribution, 37, spec.total_width, spec.density)
    assert got.shape == (37, 104) and got.dtype == torch.float32
    if distribution == "gaussian":  # transcendental functions: equal to a tolerance only
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:  # integer-derived values: bit-identical on every backend
        assert torch.equal(got, want)


def test_distribution_statistics():
    n = 200_000
    for dist, mean, var in (
        ("uniform", 0.0, 1 / 3),
        ("gaussian", 0.0, 1.0),
        ("rademacher", 0.0, 1.0),
        ("sparse", 0.0, 0.1),
    ):
        B = reference.feedback_matrix(7, dist, 200, n // 200)
        assert abs(B.mean().item() - mean) < 0.01, dist
        assert abs(B.var().item() - var) < 0.02 * max(var, 0.1), dist
    B = reference.feedback_matrix(7, "uniform", 200, 1000)
    assert B.min() >= -1.0 and B.max() < 1.0
    assert set(reference.feedback_matrix(7, "rademacher", 10, 100).unique().tolist()) == {-1.0, 1.0}
    sparse = reference.feedback_matrix(7, "sparse", 200, 1000, density=0.25)
    assert set(sparse.unique().tolist()) == {-1.0, 0.0, 1.0}
    assert abs((sparse != 0).float().mean().item() - 0.25) < 0.01
