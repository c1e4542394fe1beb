"""benchmarks/methods.py at the tiniest settings: the result file's fields, and the memory claim
(a virtual B keeps no bytes after a step; a materialized one keeps B)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load():
    spec = importlib.util.spec_from_file_location("bench_methods", ROOT / "benchmarks" / "methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_result_file_has_every_method_ratios_and_provenance(tmp_path):
    bench = load()
    biotorch = importlib.util.find_spec("biotorch") is not None
    bench.main(
        ["--repeats", "1", "--min-time", "0.001", "--workloads", "cnn", "--out", str(tmp_path)]
        + ([] if biotorch else ["--no-biotorch"])
    )
    (path,) = (tmp_path / "results").glob("methods_cpu_*.json")
    result = json.loads(path.read_text())
    assert result["command"] and result["environment"]["git_sha"] and result["machine"]["cpu_model"]
    w = result["workloads"]["cnn"]
    assert w["ratio_over_bp"]["bp"] == 1.0 and all(t > 0 for t in w["ms"].values())
    from dfa_kernels import methods

    assert set(methods.MODES) - {"shallow"} <= set(w["ms"])
    if biotorch:
        assert set(w["speedup_over_biotorch"]) == set(bench.BIOTORCH_MODES)
    assert {t["name"] for t in w["targets"]} >= {f"{m} / BP" for m in methods.LAYERWISE}
    assert (tmp_path / "plots" / path.with_suffix(".png").name).exists()


def test_virtual_b_keeps_nothing_materialized_keeps_b():
    mem = load().memory(classes=1000)
    b = mem["b_bytes_if_stored"]
    virtual = mem["dfa-virtual"]["kept_after_first_step_bytes"]
    materialized = mem["dfa-materialized"]["kept_after_first_step_bytes"]
    assert materialized - virtual == pytest.approx(b, rel=0.05)
    assert virtual == pytest.approx(mem["bp"]["kept_after_first_step_bytes"], rel=0.05)
