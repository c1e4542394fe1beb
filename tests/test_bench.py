"""Smoke tests of the benchmark suite: it runs at tiny sizes and writes complete results; the
summary script rewrites only the marked blocks of docs/benchmarks.md (and docs/zoo.md's)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from child_process import child_env

import dfa_kernels as dk
from dfa_kernels import cli, ops
from dfa_kernels.bench import common, projection, step, summary
from dfa_kernels.bench.suite import run_suite

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture
def tables(tmp_path, monkeypatch):
    """Backend tables go to a temporary folder, never into the package."""
    monkeypatch.setattr(ops, "BACKEND_TABLES", tmp_path / "tables")
    monkeypatch.setattr(projection, "BACKEND_TABLES", tmp_path / "tables")
    ops.backend_table.cache_clear()
    yield tmp_path / "tables"
    ops.backend_table.cache_clear()


def test_step_suite_tiny(tmp_path):
    out = tmp_path / "step.json"
    res = step.run("cpu", size="tiny", repeats=1, out=out, progress=False)
    saved = json.loads(out.read_text())
    assert set(saved["workloads"]) == set(step.WORKLOADS)
    for name, w in saved["workloads"].items():
        expected = set(step.variants_of(name))
        assert set(w["ms_per_step"]) == expected and all(t > 0 for t in w["ms_per_step"].values())
        assert w["ratio_over_bp"]["bp"] == 1.0
        assert w["ours"]["variant"] in step.OURS
        assert w["peak_memory_bytes"] == "not measured (CPU)"
    assert "synthetic" in saved["workloads"]["gcn"]["config"]["data"]
    assert saved["environment"]["git_sha"] and res["size"] == "tiny"
    assert saved["targets"] == []  # targets are about the full sizes


def test_step_targets():
    w = {
        "ours": {"variant": "dfa", "ratio_over_bp": 0.7},
        "speedup_over_tinydfa_style": 1.6,
        "peak_memory_bytes": {"bp": 10, "dfa": 9},
    }
    found = step.targets({"lm_micro": w, "lm_macro": w}, "cuda", "gpu")
    assert {t["name"] for t in found} >= {
        "lm_micro: DFA step / BP step",
        "lm_macro: TinyDFA-style step / DFA step",
        "lm_micro: DFA peak memory / BP peak memory",
    }
    assert all(t["met"] for t in found)
    cpu = step.targets({"mlp": {**w, "ours": {"variant": "dfa", "ratio_over_bp": 0.8}}}, "cpu", "cpu")
    assert [(t["name"], t["met"]) for t in cpu] == [("mlp: DFA step / BP step", False)]
    flops = {"lm_linear": {"flop_ratio_over_bp": {"bp": 1.0, "dfa": 0.72, "dfa_fused": 0.9}}}
    assert [(t["variant"], t["value"], t["met"]) for t in step.flop_targets(flops, {})] == [("dfa", 0.72, True)]
    chosen = {"lm_linear": {"ours": {"variant": "dfa_fused"}}}
    assert [(t["variant"], t["met"]) for t in step.flop_targets(flops, chosen)] == [("dfa_fused", False)]


def test_tinydfa_style_gives_our_gradients():
    """The baseline is the same DFA (same B, same scales): only the mechanics differ."""
    x, target = torch.randn(8, 32), torch.randint(0, 4, (8,))
    grads = []
    for dfa in (step.TinyDFAStyle(seed=0), dk.DFA(seed=0)):
        torch.manual_seed(0)
        model = step.MLP(2, 32, 4, dfa, fused=False)
        torch.nn.functional.cross_entropy(model(x), target).backward()
        if isinstance(dfa, step.TinyDFAStyle):
            dfa.finish()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["dcn", "gcn"])
def test_fused_variants_match_bp_forward(name):
    """The fused DCN/GCN forwards compute the same outputs as the models' own (in eval mode)."""
    build, _, _ = step.WORKLOADS[name](torch.device("cpu"), torch.float32, "tiny")
    torch.manual_seed(0)
    plain = build("bp").eval()
    torch.manual_seed(0)
    fused = build("dfa_fused").eval()
    fused.dfa.mode = "bp"
    if name == "dcn":
        args = (torch.randint(0, 50, (4, 5)), None)
    else:
        x, edge_index, *_ = step._cora_like("tiny")
        args = (x, edge_index)
    torch.testing.assert_close(plain(*args), fused(*args))


def test_projection_rows_and_backend_table(tmp_path, tables):
    res = projection.run("cpu", "float32", out=tmp_path / "p.json", progress=False, size="tiny", write_table=True)
    rows = res["rows"]
    assert {r["op"] for r in rows} == {"project", "project_points"}
    assert [r["N"] for r in rows if r["sweep"] and r["impl"] == "torch.mm" and r["shape"] == "recsys"] == [16, 64]
    assert all(r["ms"] > 0 for r in rows)
    assert {r["bound"] for r in rows} == {"memory", "compute"}
    assert {r["shape"] for r in rows if r["op"] == "project_points"} == {
        "points_narrow",
        "points_medium",
        "points_wide",
    }
    assert json.loads((tmp_path / "p.json").read_text())["rows"] == json.loads(json.dumps(rows))
    table = json.loads((tables / f"{ops.device_slug('cpu')}.json").read_text())  # the path's own table
    assert set(table) >= {"device", "git_sha", "date", "choices", "times_ms"}
    classes = ("narrow", "medium", "wide")
    backend_keys = {
        f"{op}|{s}|{c}" for op in ("project", "project_points") for s in ("virtual", "materialized") for c in classes
    }
    storage_keys = {f"storage|{op}|{c}" for op in ("project", "project_points") for c in classes}
    assert set(table["choices"]) == backend_keys | storage_keys
    for key in backend_keys:
        assert table["choices"][key] in {"cpu", "torch"} and table["choices"][key] in table["times_ms"][key]
    out_features = {"narrow": 4, "medium": 100, "wide": 2000}
    for key in storage_keys:  # what storage="auto" reads
        _, op, cls = key.split("|")
        assert table["choices"][key] in {"virtual", "materialized"}
        assert ops.resolve_storage("auto", dk.FeedbackSpec(out_features[cls], [8]), "cpu", op) == table["choices"][key]
    assert ops.backend_table(ops.device_slug("cpu")) == table["choices"]  # what backend="auto" reads


def test_projection_deadline_skips(tmp_path):
    res = projection.run("cpu", "float32", progress=False, size="tiny", write_table=False, time_budget_s=0.0)
    assert res["rows"] == [] and res["skipped"]


def test_device_peaks_match_names(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert common.device_peak(torch.device("cuda"))["gbps"] == 3350.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert common.device_peak(torch.device("cuda"))["gbps"] == 2000.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    peak = common.device_peak(torch.device("cuda"))
    assert peak["gbps"] == 4800.0 and set(peak["tflops"]) == {"fp32", "tf32", "bf16", "fp16"}
    assert common.device_peak(torch.device("cpu")) is None
    rows = [
        {
            "op": "project",
            "sweep": False,
            "dtype": "bfloat16",
            "impl": "cuda",
            "storage": "virtual",
            "distribution": "uniform",
            "shape": "recsys",
            "bound": "memory",
            "gbps": 3000.0,
            "tflops": 1.0,
        }
    ]
    projection._add_peaks(rows, peak)
    (t,) = projection.targets(rows, peak, "bfloat16")
    assert t["met"] is False and round(t["value"]) == 62


def test_cli_bench_tiny_writes_json_and_plots(tmp_path, tables, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no checkout here: nothing is mirrored
    cli.main(["bench", "--device", "cpu", "--tiny", "--out", str(tmp_path / "out"), "--no-progress"])
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    tag = ops.device_slug("cpu")  # cpu_<instruction-set path>
    assert names == [
        f"projection_{tag}_tiny.json",
        f"projection_{tag}_tiny.png",
        f"step_{tag}_tiny.json",
        f"step_{tag}_tiny.png",
    ]
    for name in names:
        if name.endswith(".json"):
            assert json.loads((tmp_path / "out" / name).read_text())["environment"]["device_type"] == "cpu"
    assert not tables.exists()  # tiny runs write no backend table


def _fake_checkout(tmp_path) -> Path:
    root = tmp_path / "repo"
    (root / "benchmarks" / "results").mkdir(parents=True)
    (root / "docs").mkdir()
    shutil.copy(ROOT / summary.PAGE, root / summary.PAGE)
    for path in (ROOT / "benchmarks" / "results").glob("*_cpu*.json"):  # every CPU path's step and projection
        if path.stem.startswith(("step_", "projection_")):
            shutil.copy(path, root / "benchmarks" / "results" / path.name)
    shutil.copy(ROOT / "docs" / "zoo.md", root / "docs" / "zoo.md")  # the zoo tables and departures
    if (ROOT / "benchmarks" / "results" / "zoo").is_dir():
        shutil.copytree(ROOT / "benchmarks" / "results" / "zoo", root / "benchmarks" / "results" / "zoo")
    return root


def test_summarize_rewrites_only_the_marked_block(tmp_path):
    root = _fake_checkout(tmp_path)
    res = step.run("cpu", size="tiny", repeats=1, progress=False, workloads=["mlp"])
    (root / "benchmarks" / "results" / "step_cuda.json").write_text(json.dumps(res))
    (root / "benchmarks" / "results" / "step_cuda_quick.json").write_text(json.dumps(res))  # left out
    before = (root / summary.PAGE).read_text()
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "summarize.py"), "--root", str(root)],
        check=True,
        capture_output=True,
        env=child_env(),
    )
    after = (root / summary.PAGE).read_text()
    head, tail = before.split(summary.START)[0], before.split(summary.END)[1]
    assert after.startswith(head + summary.START + "\n") and after.endswith(summary.END + tail)
    block = after[len(head) + len(summary.START) : -len(summary.END + tail)]
    assert "| mlp |" in block and "![step_cuda](plots/step_cuda.png)" in block
    cpu_steps = [p for p in (root / "benchmarks" / "results").glob("step_cpu*.json") if not p.stem.endswith("_quick")]
    assert block.count("Training step") == 1 + len(cpu_steps)
    assert (root / "benchmarks" / "plots" / "step_cuda.png").exists()
    # idempotent
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "summarize.py"), "--root", str(root), "--no-plots"],
        check=True,
        capture_output=True,
        env=child_env(),
    )
    assert (root / summary.PAGE).read_text() == after
    zoo_page = (root / "docs" / "zoo.md").read_text()
    assert zoo_page == (ROOT / "docs" / "zoo.md").read_text()  # the committed page is what the script writes
    assert "<!-- zoo-tables:start -->\nCommands:" in zoo_page and "<!-- tuning-departures:start -->\n- `" in zoo_page


def test_rewrite_refuses_without_markers(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text("# no markers\n")
    with pytest.raises(ValueError, match="bench-summary"):
        summary.rewrite_block(page, "x\n")
    assert page.read_text() == "# no markers\n"


def test_suite_mirrors_into_a_checkout(tmp_path, tables):
    root = _fake_checkout(tmp_path)
    before = (root / summary.PAGE).read_text()
    res = run_suite("cpu", tmp_path / "out", "step", tiny=True, progress=False, checkout=root, mirror=True)
    tag = ops.device_slug("cpu")
    assert (root / "benchmarks" / "results" / f"step_{tag}_tiny.json").exists()
    assert [Path(f).name for f in res["files"]] == [f"step_{tag}_tiny.json", f"step_{tag}_tiny.png"]
    after = (root / summary.PAGE).read_text()
    assert after.split(summary.START)[0] == before.split(summary.START)[0]
    assert f"step_{tag}_tiny" not in after  # smoke-test results stay out of the summary


def test_pytest_benchmark_runs_the_suite_cases(tmp_path):
    """`pytest benchmarks/ --benchmark-only` runs the projection suite's own cases (the tiniest
    here), each with its ratio to the torch baseline in extra_info; plain `pytest` collects tests/."""
    pytest.importorskip("pytest_benchmark")
    import tomllib

    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["testpaths"] == [
        "tests"
    ]
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "benchmarks/",
            "--benchmark-only",
            "--dfa-device",
            "cpu",
            "--dfa-size",
            "tiny",
            "--dfa-quick",
            "-q",
            "-p",
            "no:cacheprovider",
            "--benchmark-max-time=0.002",
            "--benchmark-min-rounds=1",
            "--benchmark-warmup=off",
            f"--benchmark-json={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=child_env(ROOT),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = json.loads(out.read_text())["benchmarks"]
    want = projection.cases("tiny", projection._compiled_backends(torch.device("cpu")), [torch.float32], quick=True)
    assert sorted(b["param"] for b in found) == sorted(c.id for c in want)
    assert {c.op for c in want} == {"project", "project_points"} and {c.storage for c in want} == {
        "virtual",
        "materialized",
    }
    for b in found:
        assert b["extra_info"]["ratio_vs_baseline"] > 0 and b["extra_info"]["baseline_ms"] > 0


def test_the_ideal_sketch_takes_the_dfa_variants_step():
    """The hand-written yardstick does what dk.DFA does: after one step from the same weights, the
    same parameters (so 'ours / ideal' compares equal work)."""
    build, loss, _ = step.WORKLOADS["mlp"](torch.device("cpu"), torch.float32, "tiny")
    models = {}
    for v in ("dfa", "ideal_sketch"):
        torch.manual_seed(0)
        models[v] = build(v)
        step._step_fn(models[v], loss, v)()
    got = dict(models["ideal_sketch"].named_parameters())
    moved = 0
    for name, p in models["dfa"].named_parameters():
        torch.testing.assert_close(got[name], p, atol=1e-6, rtol=1e-5, msg=name)
        torch.manual_seed(0)
        moved += not torch.equal(p, dict(build("dfa").named_parameters())[name])
    assert moved == len(got)  # every parameter took a step
