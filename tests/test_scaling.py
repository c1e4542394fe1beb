"""The scaling-law harness: the fits recover known laws, the analytic FLOPs match the flop counter,
an interrupted sweep resumes without redoing finished runs, the corpus and the CLI."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest

from dfa_kernels import cli
from dfa_kernels.studies import scaling
from dfa_kernels.studies import scaling_fit as fit
from dfa_kernels.zoo.data import text

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def noisy_law(compute, alpha, E, A, noise, seed=0):
    rng = np.random.default_rng(seed)
    return (E + A * compute**-alpha) * np.exp(rng.normal(0, noise, len(compute)))


@pytest.mark.parametrize("alpha,E,A", [(0.12, 1.8, 36.0), (0.3, 0.9, 1000.0), (0.2, 2.5, 250.0)])
def test_power_law_fit_recovers_alpha_and_E(alpha, E, A):
    compute = np.logspace(9, 14, 40)
    law = fit.fit_power_law(compute, noisy_law(compute, alpha, E, A, noise=0.003))
    assert law["alpha"] == pytest.approx(alpha, rel=0.15)
    assert law["E"] == pytest.approx(E, rel=0.05)
    assert fit.predict(law, 1e12) == pytest.approx(E + A * 1e12**-alpha, rel=0.01)


def test_frontier_and_bootstrap_interval():
    """Runs of growing size, each saturating: their envelope follows the law, the bootstrap CI
    over runs covers the true exponent."""
    alpha, E, A = 0.15, 1.5, 80.0
    curves = []
    for k, c_end in enumerate(np.logspace(10, 13, 8)):  # a run: above the law, on it at its end
        c = np.logspace(np.log10(c_end) - 1, np.log10(c_end), 6)
        loss = noisy_law(c, alpha, E, A, 0.002, k) * (1 + 0.005 * np.log(c_end / c) ** 2)
        curves.append(fit.curve(list(zip(c, loss))))
    grid = fit.budget_grid(curves)
    c, l = fit.frontier(curves, grid)
    assert len(c) == len(grid) and l[-1] < l[0]  # covered everywhere
    law = fit.fit_power_law(c, l)
    boot = fit.bootstrap_laws(curves, grid, law, 40, np.random.default_rng(0))
    lo, hi = fit.interval([b["alpha"] for b in boot if b is not None])
    assert lo <= law["alpha"] <= hi and abs(law["alpha"] - alpha) < 0.05


def test_frontier_chooses_on_validation_and_reports_the_held_out_loss():
    """Two configurations over the same computes: the one lower on validation is reported, with
    its test loss, even where the other is lower on test; seeds are averaged; a rise is named."""
    c = [1e9, 1e10, 1e11]
    a = fit.seeds_curve([[(x, v, t) for x, v, t in zip(c, (3.0, 2.5, 2.2), (3.1, 2.6, 2.4))]])
    b = fit.seeds_curve(
        [
            [(x, v, t) for x, v, t in zip(c, (3.2, 2.4, 2.3), (3.0, 2.5, 2.1))],
            [(x, v, t) for x, v, t in zip(c, (3.2, 2.6, 2.3), (3.0, 2.7, 2.1))],
        ]
    )
    compute, loss = fit.frontier([a, b], np.array(c))
    assert loss.tolist() == pytest.approx([3.1, 2.6, 2.4])  # b's mean validation 2.5 ties a's: a kept
    _, loss = fit.frontier([a, b], np.array(c), seeds=[np.array([0]), np.array([0, 0])])
    assert loss.tolist() == pytest.approx([3.1, 2.5, 2.4])  # b's first seed alone: 2.4 < 2.5 at 1e10
    assert fit.rises([1, 2, 3], [3.0, 2.9, 3.1]) == [{"from_flops": 2.0, "to_flops": 3.0, "rise": pytest.approx(0.2)}]


def test_verdicts_and_crossovers():
    bp = fit.law(0.10, 1.5, 50.0)
    assert fit.verdict(bp, fit.law(0.10, 1.7, 50.0), 1e10, 1e16) == "D"  # worse everywhere
    assert fit.verdict(bp, fit.law(0.10, 1.3, 50.0), 1e10, 1e16) == "A"  # better everywhere
    better_at_scale = fit.law(0.10, 1.2, 60.0)  # worse small, better large
    cross = fit.crossovers(bp, better_at_scale, 1e6, 1e20)
    assert fit.verdict(bp, better_at_scale, 1e6, 1e20) == "B" and len(cross) == 1
    assert fit.predict(bp, cross[0]) == pytest.approx(fit.predict(better_at_scale, cross[0]), rel=1e-3)
    assert fit.verdict(bp, fit.law(0.10, 1.7, 40.0), 1e6, 1e20) == "C"
    boot = [fit.law(0.10, 1.5 + d, 50.0) for d in np.linspace(-0.01, 0.01, 11)]
    worse = [fit.law(0.10, 1.7 + d, 50.0) for d in np.linspace(-0.01, 0.01, 11)]
    c = fit.compare(bp, fit.law(0.10, 1.7, 50.0), boot, worse, 1e10, 1e16)
    assert c["verdict"] == "D" and c["confidence"] == 1.0 and c["crossover_flops"] is None
    assert c["E_difference_ci"][0] > 0.17


def test_nd_fit_recovers_exponents():
    n, d = np.meshgrid(np.logspace(5, 8, 5), np.logspace(7, 10, 5))
    n, d = n.ravel(), d.ravel()
    loss = (1.7 + 400 / n**0.34 + 900 / d**0.28) * np.exp(np.random.default_rng(0).normal(0, 0.002, n.size))
    law = fit.fit_nd(n, d, loss)
    assert law["alpha"] == pytest.approx(0.34, abs=0.06) and law["beta"] == pytest.approx(0.28, abs=0.06)
    assert law["E"] == pytest.approx(1.7, rel=0.1)
    with pytest.raises(ValueError, match="at least 10 points"):
        fit.fit_nd(n[:8], d[:8], loss[:8])


@pytest.mark.parametrize("size,context", [((1, 16, 2), 16), ((2, 24, 3), 24)])
def test_analytic_flops_match_the_flop_counter(size, context):
    check = scaling.flop_check(size, vocab=256, context=context)
    assert set(check["methods"]) == set(scaling.METHODS)
    for method, row in check["methods"].items():
        assert abs(row["relative_difference"]) < 0.02, (method, row)
    per = {m: scaling.flops_per_token(size, m, 256, context)["total"] for m in scaling.METHODS}
    assert per["dfa-linear"] < per["dfa-micro"] <= per["bp"] < per["dfa-macro"] and per["shallow"] < per["dfa-linear"]


def test_linear_placement_flops_at_the_gpu_size():
    """12 x 768, T 1024, GPT-2 vocabulary, shared layout: the issue's 0.75x BP bound."""
    per = {m: scaling.flops_per_token((12, 768, 12), m, 50257, 1024)["total"] for m in ("bp", "dfa-linear")}
    assert per["dfa-linear"] / per["bp"] < 0.75


@pytest.fixture
def corpus_file(tmp_path):
    rng = np.random.default_rng(0)
    words = "the cat sat on a mat and dog ran far away over hills while birds sang songs of old".split()
    path = tmp_path / "corpus.txt"
    path.write_text("".join(" ".join(rng.choice(words, 12)) + " .\n" for _ in range(2000)))
    return path


@pytest.fixture
def fewer_starts(monkeypatch):
    """The tiny sweep's noisy frontiers make every 64-start fit slow: 8 of the starts here."""
    starts = fit.power_law_starts
    monkeypatch.setattr(fit, "power_law_starts", lambda log_y: starts(log_y)[::8])


def test_interrupted_sweep_resumes_without_redoing_runs(tmp_path, corpus_file, monkeypatch, fewer_starts):
    out = tmp_path / "sweep"
    preset = scaling.PRESETS["tiny"]
    total = len(scaling.jobs(preset))
    real, calls = scaling.train_run, []

    def interrupted(*args, **kwargs):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(scaling, "train_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        scaling.sweep("tiny", out, data=str(corpus_file), progress=False)
    assert len(list((out / "runs").glob("*.json"))) == 5 and not list(out.rglob("*.tmp"))

    resumed = []
    monkeypatch.setattr(scaling, "train_run", lambda *a, **k: resumed.append(a[1]) or real(*a, **k))
    result = scaling.sweep("tiny", out, data=str(corpus_file), progress=False, command=["dfa-kernels", "scaling"])
    assert len(resumed) == total - 5 and not set(resumed) & set(calls)  # only the unfinished runs
    assert (
        len(result["runs"]) == total and (out / "scaling.png").is_file() and (out / "scaling_frontiers.png").is_file()
    )
    saved = json.loads((out / "scaling.json").read_text())
    assert set(saved["verdicts"]) == set(scaling.DFA_METHODS) and saved["git_sha"] and saved["command"]
    assert {v["verdict"] for v in saved["verdicts"].values()} <= set(fit.VERDICTS)
    for method, f in saved["fits"].items():
        assert len(f["power_law"]["alpha_ci"]) == 2 and f["compute_decades"] > 0.5, method
    assert len(saved["flop_check"]) == len(preset.sizes)
    assert all(abs(r["relative_difference"]) < 0.02 for check in saved["flop_check"] for r in check["methods"].values())
    assert saved["cost_ratios"]["1x16x2"]["bp"] == {"flops": 1.0, "wall": 1.0}
    assert saved["cost_ratios"]["1x16x2"]["dfa-linear"]["flops"] < 0.9  # the head dominates this size
    # the verdict under every reading of the frontier, with its bootstrap
    assert set(saved["sensitivity"]) == {"primary", "all_evaluations", "late_evaluations", "no_short_budgets"}
    for reading in saved["sensitivity"].values():
        assert set(reading["verdicts"]) == set(scaling.METHODS) - {"bp"}
        assert all(len(v["E_difference_ci"]) == 2 for v in reading["verdicts"].values())
    assert (
        saved["sensitivity"]["primary"]["verdicts"]["dfa-macro"]["verdict"] == saved["verdicts"]["dfa-macro"]["verdict"]
    )
    # every method tuned every group it trains on the same values, at every tuning budget
    tried = {}
    for row in saved["tuning"]:
        key = (tuple(row["size"]), row["steps"])
        body = {g["lr"] for g in row["grid"]} if row["method"] != "shallow" else None
        tried.setdefault(key, {})[row["method"]] = (body, {g["head_lr"] for g in row["grid"]})
    assert len(tried) == len(preset.sizes) * len(preset.tune_budgets)
    for methods in tried.values():
        assert {m: h for m, (_, h) in methods.items()} == {m: set(preset.lr_grid["head"]) for m in scaling.METHODS}
        assert all(b == set(preset.lr_grid["body"]) for m, (b, _) in methods.items() if m != "shallow")
    # the frontier's configurations: one per size and budget, the extra seeds where the preset asks
    assert saved["fits"]["bp"]["configurations"] == len(preset.sizes) * len(preset.budgets)
    assert saved["seed_spread"]["bp"]["configurations"] == len(preset.sizes) * len(preset.extra_seed_budgets)
    assert all("test_loss" in e for r in saved["runs"] for e in r["evals"])

    again = []  # finished: nothing to run
    monkeypatch.setattr(scaling, "train_run", lambda *a, **k: again.append(1))
    scaling.sweep("tiny", out, resume=True, progress=False)
    assert again == []
    with pytest.raises(scaling.PlanMismatch, match="data"):
        scaling.sweep("tiny", out, data=str(tmp_path / "other.txt"), progress=False)


def test_staged_sweep_resumes_across_invocations_and_reuses_runs_of_the_same_setup(
    tmp_path, corpus_file, monkeypatch, fewer_starts
):
    """Stage by stage, each invocation cut short by its time budget, the sweep finishes; a second
    sweep seeded with the first's run files trains nothing; a run of another setup is refused."""
    preset = scaling.PRESETS["tiny"]
    stages = scaling.stages(preset, 256)
    assert len(stages) > 1
    out, invocations = tmp_path / "staged", 0
    for k in range(1, len(stages) + 1):
        while True:
            invocations += 1
            scaling.sweep("tiny", out, data=str(corpus_file), stage=str(k), time_budget_s=0.5, progress=False)
            log = json.loads((out / "invocations.json").read_text())
            if log[-1]["runs_trained"] == 0:
                break
    assert invocations > len(stages) + 1  # the time budget cut some short
    result = scaling.sweep("tiny", out, data=str(corpus_file), stage="fit", progress=False)
    assert result["finished"] and len(result["runs"]) == len(scaling.jobs(preset))

    copy = tmp_path / "copy"
    (copy / "runs").mkdir(parents=True)
    for p in (out / "runs").glob("*.json"):
        (copy / "runs" / p.name).write_text(p.read_text())
    trained = []
    monkeypatch.setattr(scaling, "train_run", lambda *a, **k: trained.append(1))
    assert scaling.sweep("tiny", copy, data=str(corpus_file), progress=False)["finished"] and trained == []
    other = tmp_path / "other"
    (other / "runs").mkdir(parents=True)
    run = json.loads(next((out / "runs").glob("*.json")).read_text())
    (other / "runs" / "x.json").write_text(json.dumps({**run, "setup": {**run["setup"], "batch": 99}}))
    with pytest.raises(scaling.PlanMismatch, match="another setup"):
        scaling.sweep("tiny", other, data=str(corpus_file), progress=False)


def test_cpu_presets_span_their_decades_and_the_long_one_is_staged():
    """cpu: about 3 decades of compute for BP and each DFA placement at about 20 minutes (estimated,
    idle machine); cpu-long: 3.5+ decades, about an hour, stages of about 10 minutes; every cpu run
    is one of its."""

    def decades(preset, method):
        lo = (
            scaling.flops_per_token(preset.sizes[0], method, 256, preset.context)["total"]
            * preset.batch
            * preset.context
            * max(1, round(preset.min_fraction * min(preset.budgets)))
        )
        hi = (
            scaling.flops_per_token(preset.sizes[-1], method, 256, preset.context)["total"]
            * preset.batch
            * preset.context
            * max(preset.budgets)
        )
        return math.log10(hi / lo)

    def minutes(preset):
        return sum(scaling.estimated_seconds(j, preset, 256) for j in scaling.jobs(preset)) / 60

    cpu, long = scaling.PRESETS["cpu"], scaling.PRESETS["cpu-long"]
    compared = ("bp", *scaling.DFA_METHODS)
    assert all(decades(cpu, m) > 2.85 for m in compared) and minutes(cpu) < 25
    assert all(decades(long, m) > 3.55 for m in compared) and 50 < minutes(long) < 90
    for stage in scaling.stages(long, 256):
        assert sum(scaling.estimated_seconds(j, long, 256) for j in stage) <= long.stage_seconds or len(stage) == 1
    shared = {k: v for k, v in scaling.plan_dict("cpu", cpu, None, "byte", 0, "cpu").items() if k in scaling.SETUP_KEYS}
    assert shared == scaling.setup_of(scaling.plan_dict("cpu-long", long, None, "byte", 0, "cpu"))
    long_jobs = {(long.sizes[j.size], j.method, j.steps, j.stage, j.lr, j.warmup, j.seed) for j in scaling.jobs(long)}
    assert {
        (cpu.sizes[j.size], j.method, j.steps, j.stage, j.lr, j.warmup, j.seed) for j in scaling.jobs(cpu)
    } <= long_jobs


def test_gpu_preset_stages_fit_a_device_call(capsys):
    preset = scaling.PRESETS["gpu"]
    stages = scaling.stages(preset, 256)
    assert sum(len(s) for s in stages) == len(scaling.jobs(preset)) and len(stages) > 3
    for stage in stages:
        jobs = [scaling.estimated_seconds(j, preset, 256) for j in stage]
        assert sum(jobs) <= preset.stage_seconds or len(jobs) == 1
        assert max(jobs) < 540  # any single run fits a 10-minute call
    sizes = [12 * layers * d * d for layers, d, _ in preset.sizes]
    assert max(sizes) > 8e7 and sizes == sorted(sizes)
    cli.main(["scaling", "--preset", "gpu", "--plan"])
    assert "stage 1:" in capsys.readouterr().out


def test_wikitext_cleaning():
    markup = (
        "'''Anarchism''' is a [[political philosophy|philosophy]]{{sfn|Ref|{{nested}}}} that [[Liberty]].<ref>"
        'cite</ref>\n== History ==\n* item [http://x.org label]\n{| class="wikitable"\n| a || b\n|}\n'
        "[[File:x.png|thumb|a [[cat]] caption]]\n[[Category:Things]]\n&lt;!-- hidden --&gt;done"
    )
    assert text.clean_wikitext(markup) == "Anarchism is a philosophy that Liberty.\n\nHistory\n\nitem label\n\ndone\n"


@pytest.mark.skipif(
    importlib.util.find_spec("gensim") is None,
    reason="the Wikipedia articles need gensim (data only): pip install --no-deps -r requirements/data.txt",
)
def test_wikipedia_articles():
    articles = text.wikipedia_articles()
    assert len(articles) > 90 and 2.5e6 < sum(map(len, articles.values())) < 3.5e6
    body = "\n".join(articles.values())
    assert "{{" not in body and "<ref" not in body and "'''" not in body
    split = text.wikipedia_split(articles)
    assert len(split["val"]) == len(split["test"]) >= 5 and not set(split["val"]) & set(split["train"])


@pytest.mark.skipif(importlib.util.find_spec("tokenizers") is None, reason="BPE needs tokenizers: pip install '.[zoo]'")
def test_bpe_tokenizer(corpus_file):
    data = text.load_wikitext(corpus_file, "bpe", bpe_vocab=300)
    assert data.tokenizer == "bpe" and 256 < data.vocab_size <= 300
    sample = data.splits["val"][:40]
    assert data.encode(data.decode(sample)).tolist() == sample.tolist()
    assert len(data.splits["train"]) < 0.8 * len(corpus_file.read_bytes()) * 0.9  # merges shorten the text


def test_the_cli_offers_every_user_preset():
    """Every preset but the tests' own "tiny" is reachable from `dfa-kernels scaling --preset`."""
    from dfa_kernels import cli

    parser = cli.build_parser()
    for name in scaling.PRESETS:
        if name != "tiny":
            assert parser.parse_args(["scaling", "--preset", name]).preset == name
