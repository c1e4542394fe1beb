"""t-SNE maps of what BP, DFA and shallow training learned (paper 1's Figure 2), with numbers.

``dfa-kernels tsne TASK`` trains the task three times (modes bp, dfa, shallow; everything else the
same), takes each model's learned representation — what the task's recipe exposes as
``Run.represent``: a graph's nodes at the last hidden layer coloured by class, a recommender's test
rows at the last hidden layer coloured by label, a language model's token embeddings of the most
frequent bytes coloured by byte class — and embeds it in 2-D with scikit-learn's ``TSNE``. One
figure puts the three maps side by side; ``tsne.json`` says how separable each is, so the picture
is not the only evidence:

- ``knn_acc_2d``: 5-fold cross-validated accuracy of a 5-nearest-neighbour classifier on the 2-D map;
- ``silhouette_2d``: the silhouette score of the labels on the 2-D map (-1 .. 1);
- ``knn_acc_raw``: the same k-NN on the raw hidden representation (t-SNE can exaggerate clusters:
  this one cannot).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ..figures import save_figure

MODES = ("bp", "dfa", "shallow")
MAX_POINTS = 3000  # larger representations are subsampled (stratified, seeded): t-SNE is O(n log n) per step
PERPLEXITY = 30.0
NEIGHBOURS = 5
FOLDS = 5


def separability(X: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    """5-fold cross-validated accuracy of a 5-NN classifier on X (stratified folds)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    folds = min(FOLDS, int(np.bincount(labels).min()))
    if folds < 2:
        raise ValueError("every label needs at least 2 samples for cross-validated k-NN accuracy")
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(cross_val_score(KNeighborsClassifier(NEIGHBOURS), X, labels, cv=cv).mean())


def embed(X: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict:
    """The 2-D t-SNE map of X and its separability numbers."""
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_score

    perplexity = min(PERPLEXITY, (len(X) - 1) / 3)
    Y = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(X)
    return {
        "map": Y,
        "knn_acc_2d": separability(Y, labels, seed),
        "silhouette_2d": float(silhouette_score(Y, labels)),
        "knn_acc_raw": separability(X, labels, seed),
        "points": int(len(X)),
        "dims_raw": int(X.shape[1]),
        "perplexity": perplexity,
    }


def plot(maps: dict, label_names: list[str], path, title: str) -> Path:
    """One panel per mode (the 2-D maps, coloured by label) with its k-NN accuracy and silhouette."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(maps), figsize=(4.2 * len(maps), 4.4), squeeze=False)
    cmap = plt.get_cmap("tab10" if len(label_names) <= 10 else "tab20")
    for ax, (mode, m) in zip(axes[0], maps.items()):
        Y, labels = m["map"], m["labels"]
        for k, name in enumerate(label_names):
            sel = labels == k
            ax.scatter(Y[sel, 0], Y[sel, 1], s=4, color=cmap(k % cmap.N), label=name, linewidths=0)
        ax.set_title(f"{mode}: k-NN {m['knn_acc_2d']:.2f}, silhouette {m['silhouette_2d']:.2f}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(markerscale=3, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, bbox_inches="tight")


def subsample(X: np.ndarray, labels: np.ndarray, max_points: int, seed: int):
    """At most `max_points` rows, the same share of every label (stratified), chosen by `seed`."""
    if len(X) <= max_points:
        return X, labels
    from sklearn.model_selection import train_test_split

    keep, _ = train_test_split(np.arange(len(X)), train_size=max_points, stratify=labels, random_state=seed)
    keep = np.sort(keep)
    return X[keep], labels[keep]


def run_study(task_name: str, config, modes=MODES, max_points: int = MAX_POINTS) -> dict:
    """Train `task_name` in every mode, embed each representation (at most `max_points` rows);
    writes OUT/TASK/tsne.{json,png}."""
    from ..provenance import provenance
    from ..zoo import tasks
    from ..zoo.training import train, variant_name

    task = tasks.get(task_name)
    out = Path(config.out or "runs") / task.name
    maps, label_names, what, runs = {}, None, None, {}
    for mode in modes:
        cfg = dataclasses.replace(config, mode=mode, out=out / f"tsne-{mode}")
        run = task.build(cfg)
        if run.represent is None:
            raise ValueError(
                f"task {task.name!r} exposes no representation to embed (t-SNE covers the graph, "
                "recommender and language-model tasks)"
            )
        result = train(task, cfg, run)
        X, labels, label_names, what = run.represent(run.model)
        X, labels = subsample(
            np.asarray(X, dtype=np.float64), np.asarray(labels, dtype=np.int64), max_points, config.seed
        )
        maps[mode] = {**embed(X, labels, config.seed), "labels": labels}
        runs[mode] = {
            "variant": variant_name(task, cfg),
            task.metric: result.final.get(task.metric),
            "config": result.config,
        }
        print(
            f"{task.name} [{mode}]: k-NN (2-D) {maps[mode]['knn_acc_2d']:.3f}, silhouette "
            f"{maps[mode]['silhouette_2d']:.3f}, k-NN (raw) {maps[mode]['knn_acc_raw']:.3f}",
            flush=True,
        )
    figure = plot(maps, label_names, out / "tsne.png", f"{task.name}: t-SNE of {what}")
    report = {
        "task": task.name,
        "representation": what,
        "labels": label_names,
        "method": f"sklearn TSNE (2-D, perplexity {PERPLEXITY} or less for small sets, PCA init, "
        f"random_state = seed); {NEIGHBOURS}-NN accuracy, {FOLDS}-fold stratified CV",
        "modes": {
            mode: {k: v for k, v in m.items() if k not in ("map", "labels")} | runs[mode] for mode, m in maps.items()
        },
        "figure": str(figure),
        "provenance": provenance(),
    }
    (out / "tsne.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"-> {out}/tsne.json, {figure}")
    return report
