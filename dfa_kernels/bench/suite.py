"""The whole benchmark suite in one call (``dfa-kernels bench``): the projection microbenchmark
(which writes the backend table ``backend="auto"`` reads), then the training steps, then plots
and the README summary, within a time budget.

Files: ``OUT/{projection,step}_<tag>.json``, ``OUT/{projection,step}_<tag>.png`` and a copy of the
backend table ``OUT/<device slug>.json``; the tag is ``cuda``, or on a CPU ``cpu_<instruction-set
path>`` (``cpu_avx512``, ``cpu_avx2``: ``dfa-kernels bench --cpu-isa all`` measures each path). Run
from a checkout (a ``benchmarks/results`` folder in the working directory), a full run also copies
the JSON to ``benchmarks/results/``, draws ``benchmarks/plots/`` and rewrites docs/benchmarks.md's
marked summary block. Quick runs name their files ``*_quick`` and touch nothing but OUT.
"""

from __future__ import annotations

import shutil
import time
import traceback
from pathlib import Path

import torch

from .. import ops
from . import plots, projection, step, summary
from .common import Deadline

# Seconds for the whole suite when none is given: the GPU suite fits in ~8 minutes with the
# startup and the Triton compiles, the CPU one is not limited. Projection gets its share first.
DEFAULT_BUDGET_S = {"cuda": 390.0, "cpu": None}
PROJECTION_SHARE = 0.5
RESERVE_S = 15.0  # plots, summary, file copies


def run_suite(
    device: str = "cpu",
    out: Path = Path("benchmarks/results"),
    which: str = "all",
    quick: bool = False,
    tiny: bool = False,
    time_budget_s: float | None = -1.0,
    progress: bool = True,
    checkout: Path | None = None,
    mirror: bool | None = None,
) -> dict:
    """Run the suite; returns {"files": [...], "projection": result, "step": result}.

    time_budget_s: seconds for the whole suite (-1: DEFAULT_BUDGET_S of the device, None: no
    limit). checkout: the repository root to mirror results into (default: the working directory
    when it holds benchmarks/results); mirror=None: only full (not quick, not tiny) runs mirror.
    """
    start = time.perf_counter()
    dev = torch.device(device)
    kind = dev.type
    tag = ops.device_slug(dev) if kind == "cpu" else kind  # CPU files name the instruction-set path
    if time_budget_s is not None and time_budget_s < 0:
        time_budget_s = DEFAULT_BUDGET_S.get(kind)
    deadline = Deadline(time_budget_s)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_tiny" if tiny else ("_quick" if quick else "")
    full = not (quick or tiny)
    checkout = Path(checkout) if checkout is not None else Path.cwd()
    mirror = (full if mirror is None else mirror) and (checkout / "benchmarks" / "results").is_dir()
    files, results = [], {}

    def budget(share: float | None = None):
        left = deadline.left() - RESERVE_S
        if left == float("inf"):
            return None
        return max(1.0, left * share if share else left)

    if which in ("all", "projection"):
        path = out / f"projection_{tag}{suffix}.json"
        results["projection"] = res = projection.run(
            device,
            quick=quick,
            out=path,
            progress=progress,
            write_table=full,
            time_budget_s=budget(PROJECTION_SHARE if which == "all" else None),
            size="tiny" if tiny else None,
        )
        projection.print_table(res)
        files.append(path)
        if res.get("backend_table"):
            table = Path(res["backend_table"])
            if table.resolve() != (out / table.name).resolve():
                shutil.copy(table, out / table.name)
            files.append(out / table.name)
    if which in ("all", "step"):
        path = out / f"step_{tag}{suffix}.json"
        results["step"] = res = step.run(
            device,
            size="tiny" if tiny else None,
            repeats=1 if tiny else (3 if quick else 5),
            out=path,
            progress=progress,
            time_budget_s=budget(),
            timing=step.TIMING_QUICK if quick else None,
        )
        step.print_table(res)
        files.append(path)
    # plots beside the results; a checkout's own results folder keeps its plots in benchmarks/plots
    in_checkout = mirror and out.resolve() == (checkout / "benchmarks" / "results").resolve()
    plot_dir = checkout / "benchmarks" / "plots" if in_checkout else out
    for name, res in results.items():
        png = plot_dir / f"{name}_{tag}{suffix}.png"
        try:
            (plots.plot_step if name == "step" else plots.plot_projection)(res, png)
        except ImportError as err:  # matplotlib missing
            print(f"plot {png.name} not drawn: {err}")
        except Exception:  # noqa: BLE001 - a plot must not cost the results
            traceback.print_exc()
        if png.exists():
            files.append(png)
    if mirror:
        results_dir = checkout / "benchmarks" / "results"
        for name in results:
            src = out / f"{name}_{tag}{suffix}.json"
            if src.resolve() != (results_dir / src.name).resolve():
                shutil.copy(src, results_dir / src.name)
        page = checkout / summary.PAGE
        if page.exists() and summary.START in page.read_text():
            try:
                n = summary.summarize(checkout)
                print(
                    f"{page}: benchmark summary rewritten from {n} result files; plots in "
                    f"{checkout / 'benchmarks' / 'plots'}"
                )
            except Exception:  # noqa: BLE001 - the results are written already
                traceback.print_exc()
    print(f"bench suite: {time.perf_counter() - start:.0f} s; files under {out}/: " + ", ".join(p.name for p in files))
    return {"files": [str(p) for p in files], **results}
