"""The t-SNE study: separability numbers, and `dfa-kernels tsne` on a zoo task."""

import json

import numpy as np
import pytest

from dfa_kernels.studies import tsne


def test_separability_numbers_tell_clusters_from_noise():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 60)
    clustered = rng.normal(size=(180, 8)) + 6.0 * np.eye(8)[labels]
    noise = rng.normal(size=(180, 8))
    good, bad = tsne.embed(clustered, labels), tsne.embed(noise, labels)
    assert good["knn_acc_raw"] > 0.95 and good["knn_acc_2d"] > 0.95 and good["silhouette_2d"] > 0.5
    assert bad["knn_acc_raw"] < 0.6 and bad["silhouette_2d"] < 0.2
    assert good["map"].shape == (180, 2)


def test_tsne_command_on_a_zoo_task(tmp_path):
    pytest.importorskip("torch_geometric")
    from dfa_kernels import cli

    cli.main(["tsne", "gcn-cora", "--epochs", "3", "--max-points", "400", "--out", str(tmp_path), "--no-progress"])
    report = json.loads((tmp_path / "gcn-cora" / "tsne.json").read_text())
    assert list(report["modes"]) == ["bp", "dfa", "shallow"]
    for m in report["modes"].values():
        assert m["points"] == 400 and 0 <= m["knn_acc_2d"] <= 1 and -1 <= m["silhouette_2d"] <= 1
        assert 0 <= m["knn_acc_raw"] <= 1 and "test_acc" in m
    assert report["labels"] == [f"class {k}" for k in range(7)] and report["provenance"]["command"]
    assert (tmp_path / "gcn-cora" / "tsne.png").stat().st_size > 10000


def test_subsample_is_stratified_and_seeded():
    labels = np.repeat([0, 1], [900, 100])
    X = np.arange(1000.0)[:, None]
    a, la = tsne.subsample(X, labels, 100, seed=0)
    b, _ = tsne.subsample(X, labels, 100, seed=0)
    assert len(a) == 100 and (la == 1).sum() == 10 and np.array_equal(a, b)


def test_tsne_refuses_a_task_without_a_representation(tmp_path):
    from dfa_kernels.studies.tsne import run_study
    from dfa_kernels.zoo.tasks import TrainConfig

    with pytest.raises(ValueError, match="exposes no representation"):
        run_study("nerf", TrainConfig("nerf", epochs=1, out=tmp_path, progress=False), modes=["bp"])
