"""Smoke tests of the benchmark suite: it runs at tiny sizes and writes complete results."""
import json

import pytest
import torch

from dfa_kernels import ops
from dfa_kernels.bench import projection, step


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_step_suite_tiny(tmp_path):
    out = tmp_path / "step.json"
    res = step.run("cpu", size="tiny", repeats=1, out=out, progress=False)
    saved = json.loads(out.read_text())
    assert set(saved["workloads"]) == set(step.WORKLOADS)
    for name, w in saved["workloads"].items():
        expected = set(step.VARIANTS) if name in step.FUSABLE else set(step.VARIANTS) - {"dfa_fused"}
        assert set(w["ms_per_step"]) == expected and all(t > 0 for t in w["ms_per_step"].values())
        assert w["ratio_over_bp"]["bp"] == 1.0
    assert saved["environment"]["git_sha"] and res["size"] == "tiny"


def test_tinydfa_style_gives_our_gradients():
    """The baseline is the same DFA (same B, same scales): only the mechanics differ."""
    x, target = torch.randn(8, 32), torch.randint(0, 4, (8,))
    grads = []
    for dfa in (step.TinyDFAStyle(seed=0), __import__("dfa_kernels").DFA(seed=0)):
        torch.manual_seed(0)
        model = step.MLP(2, 32, 4, dfa, fused=False)
        torch.nn.functional.cross_entropy(model(x), target).backward()
        if isinstance(dfa, step.TinyDFAStyle):
            dfa.finish()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_projection_rows_and_backend_table(tmp_path, monkeypatch):
    monkeypatch.setitem(projection.SHAPES, "cpu", {"graph": (64, 7, 96), "lm512": (32, 40, 64)})
    monkeypatch.setitem(projection.SWEEP, "cpu", {"graph": (16, 32)})
    monkeypatch.setitem(projection.POINTS, "cpu", (16, 8, (24, 9)))
    res = projection.run("cpu", "float32", out=tmp_path / "p.json", progress=False)
    rows = res["rows"]
    assert {r["op"] for r in rows} == {"project", "project_points"}
    assert [r["N"] for r in rows if r["sweep"] and r["impl"] == "torch.mm"] == [16, 32]
    assert all(r["ms"] > 0 for r in rows)
    assert {r["bound"] for r in rows} == {"memory", "compute"}
    monkeypatch.setattr(ops, "BACKEND_TABLES", tmp_path / "tables")
    monkeypatch.setattr(projection, "BACKEND_TABLES", tmp_path / "tables")
    path = projection.write_backend_table(rows, torch.device("cpu"), res["environment"])
    table = json.loads(path.read_text())
    assert table["choices"]["project|virtual|narrow"] in ("cpu", "torch")
    assert set(table["choices"]) >= {"project|materialized|medium", "project_points|virtual|narrow"}
