"""The README's zoo tables, generated from the comparison reports in ``benchmarks/results/zoo/``.

``benchmarks/summarize.py`` writes them between ``<!-- zoo-tables:start -->`` and
``<!-- zoo-tables:end -->``. Every table says the command that made it and its git SHA; a paper's
number is printed only beside a number of the same metric on the same data and split.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

START, END = "<!-- zoo-tables:start -->", "<!-- zoo-tables:end -->"
# Launay et al. 2020, Tables A.1 and A.2: the cosine between the DFA and BP updates (Cora after 250
# epochs; the recommenders on Criteo). DNA's was measured on its own split (the paper's alignment.py
# splits Cora for DNA with StratifiedKFold, as for its accuracy), so it sits beside that split's row.
PAPER_ALIGNMENT = {
    "cheb-cora": 0.87,
    "gcn-cora": 0.77,
    "spline-cora": 0.56,
    "gat-cora": 0.63,
    "dna-cora@cora-stratified": 0.92,
    "dcn-ml100k": 0.40,
    "afn-ml100k": 0.49,
}
COLUMNS = ("bp", "dfa", "dfa-ours", "shallow")
HEADERS = {"bp": "BP", "dfa": "DFA (paper's feedback)", "dfa-ours": "DFA (ours)", "shallow": "shallow"}


def load(directory: Path) -> dict[str, dict]:
    """{TASK[@DATA]: report} of every comparison report in `directory`."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(Path(directory).glob("*.json"))}


def _cell(summary: dict | None, scale: float = 1.0, digits: int = 1) -> str:
    if not summary or summary.get("mean") is None:
        return "—"
    text = f"{summary['mean'] * scale:.{digits}f}"
    if summary.get("std") is not None:
        text += f" ± {summary['std'] * scale:.{digits}f}"
    return text


def _origin(reports: list[dict]) -> str:
    shas = sorted({(r["provenance"].get("git_sha") or "?")[:9] for r in reports})
    return f"git {', '.join(shas)}"


def _stopping(reports: list[dict]) -> str:
    runs = [run for r in reports for run in r["runs"]]
    patience = sum(run["final"].get("stopped") == "patience" for run in runs)
    rising = [
        f"{r['task']} {run['variant']} s{run['seed']}"
        for r in reports
        for run in r["runs"]
        if run["final"].get("still_improving_at_budget")
    ]
    text = f"{patience} of {len(runs)} runs ended by early stopping"
    if rising and len(rising) == len(runs):
        return text + "; every run was still improving when its budget ended"
    return text + (
        f"; still improving when the budget ended: {', '.join(rising)}"
        if rising
        else "; none was still improving when its budget ended"
    )


def graph_tables(reports: dict[str, dict]) -> list[str]:
    lines = []
    datasets = [
        ("", "Cora, public Planetoid split (the paper's Table 3, except DNA)"),
        (
            "@cora-stratified",
            "Cora, random stratified 20/20/60 split drawn with each run's seed "
            "(542 / 542 / 1624 nodes: the split of the paper's DNA row)",
        ),
        ("@citeseer", "CiteSeer, public split"),
        ("@citeseer-stratified", "CiteSeer, random stratified 20/20/60 split drawn with each run's seed"),
        ("@cora-random", "Cora (LINQS release in graphdatascience), random split 20/class, 500, 1000"),
    ]
    for suffix, title in datasets:
        rows = [(m, reports.get(f"{m}-cora{suffix}")) for m in ("gcn", "gat", "cheb", "spline", "dna", "gae")]
        rows = [(m, r) for m, r in rows if r is not None]
        if not rows:
            continue
        comparable = any(r["paper_comparable"] for _, r in rows)  # a paper column; per row: its own verdict
        head = ["model", *(HEADERS[c] for c in COLUMNS)] + (["paper BP / DFA / shallow"] if comparable else [])
        lines += [
            f"**{title}** — test accuracy % (GAE: link-prediction AUC ×100) at the best validation epoch, "
            f"mean ± std over seeds {rows[0][1]['summary']['bp']['seeds']} ({_origin([r for _, r in rows])}):",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        for model, r in rows:
            cells = [_cell(r["summary"].get(c), 100.0) for c in COLUMNS]
            if comparable and not r["paper_comparable"]:  # the paper's number measures another split
                cells.append("not comparable")
            elif comparable:
                paper = [r["summary"].get(c, {}).get("paper") for c in ("bp", "dfa", "shallow")]
                cells.append(" / ".join("—" if p is None else f"{100 * p:.1f}" for p in paper))
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines += [""]
        for model, r in rows:
            if comparable and not r["paper_comparable"]:
                lines.append(f"{model}: the paper's numbers measure {r['paper_setting']}, not this split.")
        lines += [_stopping([r for _, r in rows]) + ".", ""]
    return lines


def family_table(
    reports: dict[str, dict], family: str, title: str, scale: float, digits: int, row_names=None
) -> list[str]:
    rows = [r for r in reports.values() if r["family"] == family]
    if not rows:
        return []
    variants = list(dict.fromkeys(v for r in rows for v in r["summary"]))
    lines = [
        f"**{title}** — {rows[0]['metric']} of the model selected on validation, mean ± std over seeds "
        f"{rows[0]['summary'][variants[0]]['seeds']} ({_origin(rows)}):",
        "",
    ]
    if row_names is None:  # one row per task, one column per variant
        head = ["model", *(HEADERS.get(v, v) for v in COLUMNS if any(v in r["summary"] for r in rows))]
        cols = [v for v in COLUMNS if any(v in r["summary"] for r in rows)]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            lines.append(
                f"| {r['task'].split('-')[0]} | "
                + " | ".join(_cell(r["summary"].get(c), scale, digits) for c in cols)
                + " |"
            )
    else:  # one row per variant
        lines += ["| run | " + " | ".join(r["task"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
        for v in variants:
            lines.append(
                f"| {row_names(v)} | " + " | ".join(_cell(r["summary"].get(v), scale, digits) for r in rows) + " |"
            )
    if not any(r["paper_comparable"] for r in rows):
        lines += ["", f"The paper's numbers measure {rows[0]['paper_setting']}: not comparable, so not shown."]
    return lines + ["", _stopping(rows) + ".", ""]


def alignment_table(reports: dict[str, dict]) -> list[str]:
    """DFA's alignment with backprop at the end of training, for the DFA runs with the paper's
    feedback: the deepest DFA point (the one farthest from the output) and the whole network."""
    lines = [
        "**Alignment at the end of training** (the DFA runs with the paper's feedback, mean ± std over "
        "seeds; the deepest point is the DFA-trained layer farthest from the output). Signal: the "
        "per-sample cosine between DFA's signal and backprop's gradient at that point, over the rows "
        "where both are non-zero; in the paper's convention, over every row, rows where both are zero "
        "counting as 1 (TinyDFA's measurement, which the paper's Tables A.1/A.2 report). Update: the "
        "cosine between the DFA weight update of the layers the point trains, or of every DFA-trained "
        "layer (network), and their BP gradient.",
        "",
        "| task | signal | signal, paper's convention | update | update, network | paper (Tables A.1/A.2) |",
        "|---|---|---|---|---|---|",
    ]

    def stat(values):
        values = [v for v in values if v is not None]
        if not values:
            return None
        return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else None}

    def deepest(a):
        return a["dfa_modules"][a["deepest"]["dfa"]]["points"][a["deepest"]["point"]]

    for name, r in reports.items():
        runs = [
            run
            for run in r["runs"]
            if run["variant"].startswith("dfa") and "-ours" not in run["variant"] and run.get("alignment")
        ]
        for variant in dict.fromkeys(run["variant"] for run in runs):
            finals = [run["alignment"][-1] for run in runs if run["variant"] == variant]
            paper = PAPER_ALIGNMENT.get(name)
            label = name + ("" if variant == "dfa" else f" ({variant[4:]})")
            cells = [
                stat([a["deepest"]["signal_cos_mean"] for a in finals]),
                stat([deepest(a)["signal"]["cos_mean_paper"] for a in finals]),
                stat([a["deepest"]["update_cos"] for a in finals]),
                stat([a["network"]["update_cos"] for a in finals]),
            ]
            lines.append(
                f"| {label} | "
                + " | ".join(_cell(c, 1, 2) for c in cells)
                + f" | {'—' if paper is None else f'{paper:.2f}'} |"
            )
    return lines + [""]


def render(directory: Path) -> str:
    reports = load(directory)
    if not reports:
        return "(no zoo results yet: `python benchmarks/zoo.py compare`)\n"
    lang = {
        "dfa-macro": "DFA macro (paper's feedback)",
        "dfa-micro": "DFA micro (paper's feedback)",
        "dfa-linear": "DFA linear (paper's feedback)",
        "dfa-ours-macro": "DFA macro (ours)",
        "dfa-ours-micro": "DFA micro (ours)",
        "dfa-ours-linear": "DFA linear (ours)",
    }
    lines = [
        "Commands: `python benchmarks/zoo.py --list` prints every command below; each report in "
        "`benchmarks/results/zoo/` records its own command, git SHA, library versions and every run.",
        "",
    ]
    lines += graph_tables(reports)
    lines += family_table(reports, "recsys", "Recommenders, MovieLens-100k CTR (per-user temporal split)", 1.0, 4)
    lines += family_table(
        reports,
        "transformer",
        "Transformer LM, byte-level Shakespeare (split by play), test loss in nats/byte",
        1.0,
        3,
        row_names=lambda v: lang.get(v, HEADERS.get(v, v)),
    )
    lines += family_table(
        reports, "nerf", "NeRF, pybullet duck (32 px), test PSNR in dB", 1.0, 2, row_names=lambda v: HEADERS.get(v, v)
    )
    lines += alignment_table(reports)
    return "\n".join(lines)


def write_readme(readme: Path, directory: Path) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme} has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{render(directory)}\n{END}{tail}")
