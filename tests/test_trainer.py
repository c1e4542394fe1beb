"""The zoo's shared training loop: selection on validation only, early stopping, resumable streams;
the comparison runner (seeds, feedbacks, paper numbers only where comparable) and the tuning runner."""

import json

import pytest
import torch
from torch import nn

from dfa_kernels.zoo import tasks
from dfa_kernels.zoo.trainer import FullBatch, Run, Sampled, Shuffled, fit


def scripted_run(val_curve, patience=None, calls=None, min_epochs=0):
    """A run whose validation metric follows `val_curve` (one value per epoch); the model's weight
    holds the epoch number, so the selected state says which epoch was kept."""
    model = nn.Linear(1, 1, bias=False)
    calls = calls if calls is not None else []
    epoch = {"n": 0}

    def loss(model, batch):
        return model.weight.sum() * 0.0

    def evaluate(model, split):
        calls.append(split)
        if split == "val":
            epoch["n"] += 1
            with torch.no_grad():
                model.weight.fill_(epoch["n"])
            return {"acc": val_curve[epoch["n"] - 1]}
        return {"acc": float(model.weight.detach())}  # "test": which epoch's weights are loaded

    return Run(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        batches=FullBatch(None),
        loss=loss,
        evaluate=evaluate,
        select="acc",
        higher_is_better=True,
        epochs=len(val_curve),
        steps_per_epoch=1,
        patience=patience,
        min_epochs=min_epochs,
    )


def test_selects_the_best_validation_epoch_and_evaluates_test_once():
    calls = []
    fitted = fit(scripted_run([0.1, 0.5, 0.3, 0.4], calls=calls), progress=False)
    assert fitted.final["best_epoch"] == 2 and fitted.final["test_acc"] == 2.0  # epoch 2's weights
    assert fitted.final["val_acc"] == 0.5 and fitted.final["stopped"] == "budget"
    assert not fitted.final["still_improving_at_budget"]
    assert calls.count("test") == 1 and calls[-1] == "test"  # test only once, after selection


def test_early_stopping_and_the_still_improving_flag():
    fitted = fit(scripted_run([0.1, 0.5, 0.4, 0.3, 0.2, 0.9], patience=3), progress=False)
    assert fitted.final["stopped"] == "patience" and fitted.final["epochs_run"] == 5
    assert fitted.final["best_epoch"] == 2
    rising = fit(scripted_run([0.1, 0.2, 0.3]), progress=False)
    assert rising.final["still_improving_at_budget"]


def test_patience_does_not_stop_a_run_before_min_epochs():
    """A plateau at first (DNA's backprop): with min_epochs the run goes on past it and finds the later best."""
    curve = [0.3, 0.3, 0.3, 0.3, 0.3, 0.6, 0.7, 0.5, 0.5, 0.5, 0.5]
    assert fit(scripted_run(curve, patience=3), progress=False).final["epochs_run"] == 4
    waited = fit(scripted_run(curve, patience=3, min_epochs=6), progress=False).final
    assert waited["best_epoch"] == 7 and waited["stopped"] == "patience" and waited["epochs_run"] == 10


def test_alignment_of_a_model_without_dfa_is_refused_before_training():
    """FM has no hidden layer (no dk.DFA module): asking for its alignment fails at once, not after training."""
    run = scripted_run([0.1, 0.2])
    run.probe = None
    with pytest.raises(ValueError, match="probe batch"):
        fit(run, progress=False, alignment_every=1)
    run.probe = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="no dk.DFA module"):
        fit(run, progress=False, alignment_every=1)


def test_streams_resume_exactly():
    for make in (
        lambda: Shuffled(10, 3, seed=4, min_size=2),
        lambda: Sampled(lambda g: torch.randint(0, 100, (4,), generator=g), seed=4),
    ):
        a = make()
        for _ in range(5):
            next(a)
        state = a.state_dict()
        want = [next(a) for _ in range(7)]
        b = make()
        b.load_state_dict(state)
        assert all(torch.equal(x, y) for x, y in zip(want, [next(b) for _ in range(7)]))
    s = Shuffled(10, 3, seed=0, min_size=2)  # 10 rows: batches 3, 3, 3 and a skipped 1
    assert len(s) == 3 and sorted(torch.cat([next(s) for _ in range(3)]).tolist()) != list(range(10))


def test_every_task_has_equal_tuning_budgets():
    """The same number of tuning candidates for every mode (and the recipe's choice among them)."""
    for name, task in tasks.all_tasks().items():
        if task.grid is None:
            continue
        sizes = {}
        for mode in task.modes:  # the modes it trains (Task.unsupported refuses the others)
            config = tasks.TrainConfig(task=name, mode=mode)
            sizes[mode] = len(task.grid(config))
            assert task.tuned(config) in task.grid(config), (name, mode)
        assert len(set(sizes.values())) == 1, (name, sizes)


def test_compare_writes_every_run_and_says_not_comparable(tmp_path):
    from dfa_kernels.zoo.training import compare_task

    task = tasks.get("lm-pydoc")
    base = tasks.TrainConfig(task="lm-pydoc", epochs=1, out=tmp_path, progress=False)
    report = compare_task(task, base, seeds=[0, 1], modes=["bp", "dfa"], feedbacks=["paper", "ours"])
    assert [r["variant"] for r in report["runs"]] == [
        "bp",
        "bp",
        "dfa-macro",
        "dfa-macro",
        "dfa-ours-macro",
        "dfa-ours-macro",
    ]
    assert report["summary"]["bp"]["n"] == 2 and report["summary"]["bp"]["std"] is not None
    assert report["runs"][2]["config"]["feedback"] == "paper" and report["runs"][4]["config"]["feedback"] == "ours"
    table = (tmp_path / "lm-pydoc" / "compare.txt").read_text()
    assert "not comparable" in table and not report["paper_comparable"]
    saved = json.loads((tmp_path / "lm-pydoc" / "compare.json").read_text())
    assert saved["provenance"]["git_sha"] and saved["runs"][0]["history"]


def test_paper_feedback_is_the_shared_layout():
    pytest.importorskip("torch_geometric")
    from dfa_kernels.zoo.training import train

    for feedback, layout in tasks.FEEDBACK.items():
        r = train(tasks.get("dna-cora"), tasks.TrainConfig("dna-cora", epochs=1, progress=False, feedback=feedback))
        assert r.model.dfa.spec.layout == layout and r.config["feedback"] == feedback
        assert r.model.error_at == ("log_softmax" if feedback == "paper" else "logits")  # paper 1's DNA


def test_tune_runs_the_grid_on_validation(tmp_path, monkeypatch):
    from dfa_kernels.zoo.tuning import tune

    task = tasks.get("lm-pydoc")
    grid = {"bp": [dict(lr=1e-3, head_lr=1e-3), dict(lr=3e-3, head_lr=3e-3)]}
    monkeypatch.setattr(task, "grid", lambda config: grid[config.mode])
    report = tune(task, tasks.TrainConfig("lm-pydoc", epochs=1, out=tmp_path, progress=False), modes=["bp"])
    trials = report["modes"]["bp"]["trials"]
    assert [t["hp"] for t in trials] == grid["bp"] and all("val_loss" in t for t in trials)
    best = min(trials, key=lambda t: t["val_loss"])["hp"]
    assert report["modes"]["bp"]["best"] == best
    assert report["modes"]["bp"]["recipe_matches"] == (task.tuned(tasks.TrainConfig("lm-pydoc", mode="bp")) == best)
    assert (tmp_path / "lm-pydoc" / "tuning.json").is_file()


def test_recipe_tables_hold_the_tuning_winners():
    """Every tuned hyper-parameter in a recipe is the winner of its committed tuning report
    (benchmarks/results/zoo/tuning/TASK.json and the family's family/TASK.tuning.json, made by
    `dfa-kernels tune`)."""
    from pathlib import Path

    zoo = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "zoo"
    reports = sorted([*(zoo / "tuning").glob("*.json"), *(zoo / "family").glob("*.tuning.json")])
    assert reports, "no tuning report committed"
    for path in reports:
        report = json.loads(path.read_text())
        task = tasks.get(report["task"])
        for variant, result in report["modes"].items():
            mode, placement = variant.split("-")[0], (variant.split("-")[-1] if "-" in variant else "macro")
            config = tasks.TrainConfig(report["task"], mode=mode, placement=placement, preset=report["preset"])
            assert task.tuned(config) == result["best"], (report["task"], variant, result["best"])
            assert len(result["trials"]) == len(task.grid(config)), (report["task"], variant)


def test_zoo_driver_commands_parse():
    """Every command benchmarks/zoo.py runs is accepted by the CLI (parsed, not run)."""
    import importlib.util
    from pathlib import Path

    from dfa_kernels import cli

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "zoo.py"
    spec = importlib.util.spec_from_file_location("zoo_driver", path)
    driver = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(driver)
    parser = cli.build_parser()
    for family, task, data in driver.ENTRIES:
        for cmd in (driver.compare_command(family, task, data), driver.tune_command(family, task, data)):
            if cmd is not None:
                args = parser.parse_args(cmd[1:])
                assert args.task == task and args.json.endswith(".json")
