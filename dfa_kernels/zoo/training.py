"""Running zoo tasks for the CLI: one run (metrics.json, curves), and the BP / DFA / shallow comparison
over seeds and feedback matrices (compare.json: every run, mean and std per variant, the paper's
number only where it measures the same thing)."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import torch

from ..align import plot_alignment
from ..figures import save_figure
from ..provenance import provenance
from . import checkpoint, distributed
from .tasks import BASE_MODES, Task, TrainConfig, TrainResult, dfa_backend
from .trainer import Stopped, Trainer


def train(
    task: Task,
    config: TrainConfig,
    run=None,
    *,
    world: distributed.World | None = None,
    checkpoints: checkpoint.Checkpoints | None = None,
    on_step=None,
) -> TrainResult:
    """Build the task's run (unless given), train it with the shared loop; the result holds the
    selected model. `world`: this process's rank of a distributed job (None: one process);
    `checkpoints`: save / resume / stop early (raises :class:`~.trainer.Stopped` when it stops; a
    resume may change ``config.epochs``, the budget, see :mod:`.checkpoint`, when the run is built here);
    `on_step(trainer)`: called after every step (after any checkpoint), e.g. to log."""
    if config.fsdp and world is None:
        raise ValueError("fsdp shards the model across processes: launch with --nproc N (N > 1) or torchrun")
    resume = checkpoint.read(checkpoints.resume) if checkpoints is not None and checkpoints.resume else None
    budget_note = None
    if run is None:
        budget = config.epochs
        if resume is not None:  # rebuilt with the first session's epochs: its schedule and hyper-parameters
            config = dataclasses.replace(config, epochs=resume["identity"]["config"]["epochs"])
        run = task.build(dataclasses.replace(config, device=distributed.rank_device(config.device, world)))
        if resume is not None:  # the budget: this command's --epochs, else the checkpoint's
            built, run.epochs = run.epochs, budget or resume.get("epochs") or run.epochs
            if run.epochs != built:
                budget_note = (
                    f"built for {built} epochs (the learning-rate schedule and these hyper-parameters "
                    f"are that run's), trained up to {run.epochs}"
                )
    strategy = "fsdp" if config.fsdp else "ddp"
    trainer = Trainer(
        run,
        progress=config.progress,
        alignment_every=config.alignment_every,
        desc=f"{task.name} [{variant_name(task, config)}]",
        world=world,
        strategy=strategy,
        compile=config.compile,
    )
    callbacks = []
    if checkpoints is not None:

        def meta():
            return checkpoint.identity(task.name, config, run, 1 if world is None else world.size, trainer.strategy)

        if resume is not None:
            state = checkpoint.verify(resume, meta())
            checkpoint.check_budget(resume, run.epochs, run.steps_per_epoch)
            trainer.load_state_dict(state)
        callbacks.append(checkpoints.callback(meta))
    if on_step is not None:
        callbacks.append(on_step)

    def after_step(trainer):
        for callback in callbacks:
            callback(trainer)

    fitted = trainer.fit(after_step if callbacks else None)
    artefacts = []
    if run.finish is not None and config.out is not None and trainer.main:
        artefacts = run.finish(run.model, Path(config.out))
    hyper_parameters = dict(run.hyper_parameters)
    if budget_note:
        hyper_parameters["epochs_changed_on_resume"] = budget_note
    return TrainResult(
        history=fitted.history,
        final=fitted.final,
        backend=dfa_backend(run.model, config.device),
        config=hyper_parameters,
        artefacts=artefacts,
        alignment=fitted.alignment,
        model=run.model,
        select=f"val_{run.select}",
        resumed_at=trainer.resumed_at,
    )


def variant_name(task: Task, config: TrainConfig) -> str:
    """ "bp", "shallow", "dfa" (the paper's feedback) or "dfa-ours"; Transformers add the placement."""
    if config.mode != "dfa":
        return config.mode
    name = "dfa" + ("" if config.feedback == "paper" else f"-{config.feedback}")
    return name + (f"-{config.placement}" if task.family == "transformer" else "")


def _plot_curves(histories: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(
        {k for h in histories.values() for row in h for k in row if k not in ("epoch", "step", "seconds", "lr")}
    )
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, history in histories.items():
            pts = [(row["epoch"], row[key]) for row in history if key in row]
            if pts:
                ax.plot(*zip(*pts), label=label)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    fig.suptitle(title)
    save_figure(fig, path)


def _jsonable(config: TrainConfig) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()}


def paper_number(task: Task, config: TrainConfig) -> float | None:
    """The paper's number for this run's mode, only when the run measures the same thing."""
    return task.paper.get(config.mode) if task.comparable(config) else None


def run_dir_of(task: Task, config: TrainConfig) -> Path:
    """OUT/TASK/VARIANT: where run_task writes (metrics.json, curves.png, checkpoint.pt)."""
    return Path(config.out or "runs") / task.name / variant_name(task, config)


def run_task(
    task: Task,
    config: TrainConfig,
    *,
    world: distributed.World | None = None,
    checkpoint_every: int | None = None,
    resume=None,
    stop_after: int | None = None,
) -> TrainResult | None:
    """Train `task` once; writes OUT/TASK/VARIANT/{metrics.json, curves.png} (and alignment.{json,png}
    with ``config.alignment_every``), on the first rank only in a distributed run.

    checkpoint_every: write OUT/TASK/VARIANT/checkpoint.pt every that many steps; resume: continue
    from a checkpoint (its file, or a run folder holding one); stop_after: end this session after
    that many steps in total, with a checkpoint there (returns None; resume it later)."""
    run_dir = run_dir_of(task, config)
    main = world is None or world.main
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(config, out=run_dir)
    checkpoints = None
    if checkpoint_every or resume or stop_after:
        checkpoints = checkpoint.Checkpoints(run_dir / checkpoint.FILENAME, checkpoint_every, resume, stop_after)
    start = time.perf_counter()
    try:
        result = train(task, config, world=world, checkpoints=checkpoints)
    except Stopped as stop:
        if main:
            print(f"{task.name} [{variant_name(task, config)}] {stop}; continue with --resume {run_dir}")
        return None
    if not main:
        return result
    wall = time.perf_counter() - start
    origin = provenance()
    if result.resumed_at:
        origin["resumed_at_steps"] = result.resumed_at
    metrics = {
        "task": task.name,
        "family": task.family,
        "mode": config.mode,
        "variant": variant_name(task, config),
        "run_config": _jsonable(config),
        "config": result.config,
        "history": result.history,
        "final": result.final,
        "backend": result.backend,
        "wall_time_s": round(wall, 1),
        "paper": paper_number(task, config),
        "paper_setting": task.paper_setting,
        "artefacts": result.artefacts,
        "provenance": origin,
    }
    if world is not None:
        metrics["distributed"] = {
            "world_size": world.size,
            "strategy": "fsdp" if config.fsdp else "ddp",
            "backend": torch.distributed.get_backend(),
        }
    if result.alignment:
        metrics["alignment"] = result.alignment
        plot_alignment(result.alignment, run_dir / "alignment.png", f"{task.name}: DFA vs BP alignment")
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    _plot_curves({config.mode: result.history}, run_dir / "curves.png", f"{task.name} ({config.mode})")
    print(
        f"{task.name} [{variant_name(task, config)}] {task.metric} = {result.final.get(task.metric)}  "
        f"(backend {result.backend}, {wall:.1f} s) -> {run_dir}/metrics.json"
    )
    return result


def _summary(values: list[float]) -> dict:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return {
        "mean": statistics.mean(values) if values else None,
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
    }


def compare_configs(
    task: Task, base: TrainConfig, seeds, modes=BASE_MODES, feedbacks=("paper",), placements=None
) -> list[TrainConfig]:
    """Every run of a comparison: each mode, each seed; DFA once per feedback (and placement)."""
    placements = placements or [base.placement]
    configs = []
    for mode in modes:
        task.check_mode(mode)  # before the first run, not after hours of others
        for feedback in feedbacks if mode == "dfa" else ("paper",):
            for placement in placements if mode == "dfa" and task.family == "transformer" else [base.placement]:
                for seed in seeds:
                    configs.append(
                        dataclasses.replace(base, mode=mode, feedback=feedback, placement=placement, seed=seed)
                    )
    return configs


def compare_task(
    task: Task,
    base: TrainConfig,
    seeds=(0,),
    modes=BASE_MODES,
    feedbacks=("paper",),
    placements=None,
    json_path: Path | None = None,
) -> dict:
    """Train every run of :func:`compare_configs`; write OUT/TASK/compare.{json,txt,png} (and
    `json_path`): each run's config, history and final metrics, mean and std per variant, the
    paper's number beside ours only where it measures the same thing."""
    out = Path(base.out or "runs")
    runs = []
    for config in compare_configs(task, base, seeds, modes, feedbacks, placements):
        result = train(
            task, dataclasses.replace(config, out=out / task.name / variant_name(task, config) / f"seed{config.seed}")
        )
        runs.append(
            {
                "variant": variant_name(task, config),
                "mode": config.mode,
                "feedback": config.feedback,
                "placement": config.placement,
                "seed": config.seed,
                "final": result.final,
                "backend": result.backend,
                "config": result.config,
                "history": result.history,
                "alignment": result.alignment,
                "artefacts": result.artefacts,
            }
        )
        print(
            f"{task.name} [{runs[-1]['variant']}] seed {config.seed}: {task.metric} = "
            f"{result.final.get(task.metric):.4f}",
            flush=True,
        )
    variants = list(dict.fromkeys(r["variant"] for r in runs))
    summary = {
        v: {
            **_summary([r["final"].get(task.metric) for r in runs if r["variant"] == v]),
            "seeds": [r["seed"] for r in runs if r["variant"] == v],
            "paper": paper_number(task, dataclasses.replace(base, mode=v.split("-")[0])),
        }
        for v in variants
    }
    report = {
        "task": task.name,
        "family": task.family,
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "data": base.data,
        "preset": base.preset,
        "paper_setting": task.paper_setting,
        "paper_comparable": task.comparable(base),
        "summary": summary,
        "runs": runs,
        "provenance": provenance(),
    }
    table = comparison_table(task, report)
    print("\n".join(table))
    compare_dir = out / task.name
    compare_dir.mkdir(parents=True, exist_ok=True)
    (compare_dir / "compare.txt").write_text("\n".join(table) + "\n")
    for path in {compare_dir / "compare.json", *([Path(json_path)] if json_path else [])}:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
    _plot_curves({f"{r['variant']} s{r['seed']}": r["history"] for r in runs}, compare_dir / "compare.png", task.name)
    if task.figure is not None:  # the first seed of every variant, side by side
        firsts = {r["variant"]: r for r in runs if r["seed"] == runs[0]["seed"]}
        for path in {compare_dir / "figure.png", *([Path(json_path).with_suffix(".png")] if json_path else [])}:
            task.figure(firsts, path)
    return report


def comparison_table(task: Task, report: dict) -> list[str]:
    """Mean ± std per variant; the paper's number only where comparable, "not comparable" otherwise."""
    lines = [
        f"{task.name}: {task.metric} ({'higher' if task.higher_is_better else 'lower'} is better), "
        f"mean ± std over seeds",
        f"{'variant':<18}{'ours':>18}{'paper':>16}  n",
    ]
    for variant, s in report["summary"].items():
        ours = "—" if s["mean"] is None else f"{s['mean']:.4f}" + ("" if s["std"] is None else f" ± {s['std']:.4f}")
        if not report["paper_comparable"]:
            paper = "not comparable"
        else:
            paper = "—" if s["paper"] is None else f"{s['paper']:.4f}"
        lines.append(f"{variant:<18}{ours:>18}{paper:>16}  {s['n']}")
    if not report["paper_comparable"]:
        lines.append(f"(the paper's numbers measure {task.paper_setting}: a different dataset, split or metric)")
    return lines
