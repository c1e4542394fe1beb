"""Resuming with another --epochs: the budget of a resumed run may change (a finished run trains for
longer), nothing else; the learning-rate schedule stays the first run's. Every refusal of
`dfa-kernels train --resume` is one line on stderr with exit status 2."""

import dataclasses
import json

import pytest
import torch

from dfa_kernels.cli import main
from dfa_kernels.zoo import checkpoint, tasks
from dfa_kernels.zoo.checkpoint import CheckpointError, Checkpoints
from dfa_kernels.zoo.training import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _history(result) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in result.history]


def _final(result) -> dict:
    return {k: v for k, v in result.final.items() if k != "train_seconds"}


def test_a_finished_run_trains_for_longer(tmp_path):
    """3 epochs with a checkpoint at the last step, resumed with epochs=6: the run of 6 epochs from
    scratch, bit for bit (gcn-cora has no schedule: its budget alone changes), and the result says so."""
    pytest.importorskip("torch_geometric")
    task, path = tasks.get("gcn-cora"), tmp_path / "ckpt.pt"
    short = tasks.TrainConfig("gcn-cora", epochs=3, progress=False)
    first = train(task, short, checkpoints=Checkpoints(path, every=1))
    assert len(first.history) == 3 and torch.load(path, weights_only=True)["epochs"] == 3
    longer = train(task, dataclasses.replace(short, epochs=6), checkpoints=Checkpoints(path, every=1, resume=path))
    fresh = train(task, dataclasses.replace(short, epochs=6))
    assert _history(longer) == _history(fresh) and _final(longer) == _final(fresh)
    assert longer.resumed_at == [3] and torch.load(path, weights_only=True)["epochs"] == 6
    assert longer.config["epochs_changed_on_resume"].startswith("built for 3 epochs")
    assert longer.config["epochs_max"] == 3  # the hyper-parameters the run was built with
    assert "epochs_changed_on_resume" not in fresh.config

    # resumed again without epochs: the checkpoint's budget (6), not the preset's nor the first run's
    again = train(task, dataclasses.replace(short, epochs=None), checkpoints=Checkpoints(path, resume=path))
    assert _history(again) == _history(fresh)


def test_the_schedule_stays_the_first_runs(tmp_path, monkeypatch):
    """The LM's warmup + cosine schedule, planned for 2 epochs of 2 steps: resumed to 4 epochs it
    stays at its floor (0.1 x lr) past step 4, where a 4-epoch run planned from the start is mid-decay."""
    from dfa_kernels.zoo.recipes import transformer as R

    monkeypatch.setitem(
        R.TRAIN, "lm-pydoc", {"cpu": {**R.TRAIN["lm-pydoc"]["cpu"], "steps_per_epoch": 2, "eval_tokens": 1024}}
    )
    task, path = tasks.get("lm-pydoc"), tmp_path / "ckpt.pt"
    config = tasks.TrainConfig("lm-pydoc", epochs=2, placement="micro", progress=False)
    first = train(task, config, checkpoints=Checkpoints(path, every=2))
    longer = train(task, dataclasses.replace(config, epochs=4), checkpoints=Checkpoints(path, resume=path))
    planned = train(task, dataclasses.replace(config, epochs=4))
    floor = first.history[-1]["lr"]
    assert floor == pytest.approx(0.1 * first.config["lr"])
    assert [row["lr"] for row in longer.history] == [row["lr"] for row in first.history] + [floor, floor]
    assert planned.history[2]["lr"] > 2 * floor  # restarted schedules would differ from kept ones here


def test_a_budget_behind_the_checkpoint_is_refused(tmp_path):
    pytest.importorskip("torch_geometric")
    task, path = tasks.get("gcn-cora"), tmp_path / "ckpt.pt"
    config = tasks.TrainConfig("gcn-cora", epochs=4, progress=False)
    with pytest.raises(Exception, match="stopped after step 3"):
        train(task, config, checkpoints=Checkpoints(path, stop_after=3))
    with pytest.raises(
        CheckpointError,
        match=r"is at step 3, past a budget of 2 epochs \(2 steps\): resume with "
        r"--epochs 3 or more",
    ):
        train(task, dataclasses.replace(config, epochs=2), checkpoints=Checkpoints(path, resume=path))
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a dfa-kernels checkpoint"):
        checkpoint.read(tmp_path / "other.pt")


def _cli(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as stop:
        main(argv)
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return stop.value.code, out, err


def test_cli_resumes_for_longer_and_refuses_in_one_line(tmp_path, capsys):
    """The issue's case: `train gcn-cora --epochs 6 --resume DIR` on a 3-epoch run's checkpoint now
    trains on; the refusals (another run, a budget behind the checkpoint, no checkpoint) are one
    line on stderr and exit status 2, without a traceback."""
    pytest.importorskip("torch_geometric")
    run = ["train", "gcn-cora", "--out", str(tmp_path), "--no-progress"]
    folder = tmp_path / "gcn-cora" / "dfa"
    assert _cli(run + ["--epochs", "3", "--checkpoint-every", "1"], capsys)[0] == 0
    code, _, err = _cli(run + ["--epochs", "6", "--resume", str(folder)], capsys)
    assert code == 0, err
    assert len(json.loads((folder / "metrics.json").read_text())["history"]) == 6

    for extra, message in (
        (["--epochs", "6", "--seed", "1"], "was written by another run"),
        (["--epochs", "2"], "past a budget of 2 epochs"),
        (["--epochs", "6", "--lr", "0.5"], "was written by another run"),
    ):
        code, _, err = _cli(run + extra + ["--resume", str(folder)], capsys)
        lines = [line for line in err.splitlines() if "Warning" not in line and line.strip() != "warnings.warn("]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith(f"dfa-kernels train: error: --resume {folder}: ") and message in lines[0]
    assert "a larger --epochs trains it for longer" in lines[0] and "; " in lines[0]  # differences listed
    code, _, err = _cli(run + ["--resume", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "no checkpoint at" in err and "Traceback" not in err
