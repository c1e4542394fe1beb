"""`dfa-kernels demo`: an MLP on scikit-learn's bundled digits, trained by BP, DFA and shallow."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .nn import DFA


class DigitsMLP(nn.Module):
    def __init__(self, dfa: DFA, hidden: int = 256, depth: int = 3):
        super().__init__()
        sizes = [64] + [hidden] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.head = nn.Linear(hidden, 10)
        self.dfa = dfa

    def forward(self, x):
        for layer in self.hidden:
            x = self.dfa.point(torch.tanh(layer(x)))
        return self.dfa(self.head(x))


def load_digits(seed: int = 0):
    """8x8 digit images bundled with scikit-learn (no download): standardized, 75/25 split."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    X, y = sk_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=seed, stratify=y)
    mean, std = Xtr.mean(0), Xtr.std(0) + 1e-6
    tensor = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return tensor(Xtr), torch.tensor(ytr), tensor(Xte), torch.tensor(yte)


LR = {"bp": 1e-3, "dfa": 1e-3, "shallow": 1e-3}  # Adam


def train(mode: str, epochs: int = 30, batch: int = 64, seed: int = 0, progress: bool = True) -> dict:
    torch.manual_seed(seed)
    Xtr, ytr, Xte, yte = load_digits(seed)
    model = DigitsMLP(DFA(mode=mode, seed=seed))
    opt = torch.optim.Adam(model.parameters(), lr=LR[mode])
    steps, step_time = 0, 0.0
    bar = tqdm(range(epochs), desc=f"{mode:>7}", disable=not progress, leave=False)
    for _ in bar:
        perm = torch.randperm(len(Xtr))
        for i in range(0, len(Xtr), batch):
            idx = perm[i : i + batch]
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(Xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
            step_time += time.perf_counter() - start
            steps += 1
        bar.set_postfix(loss=f"{loss.item():.3f}")
    with torch.no_grad():
        acc = (model(Xte).argmax(1) == yte).float().mean().item()
    backend = model.dfa.resolved_backend("cpu") if mode == "dfa" else "-"
    return {"mode": mode, "test_acc": acc, "ms_per_step": 1e3 * step_time / steps, "backend": backend}


def main(epochs: int = 30, progress: bool = True) -> list[dict]:
    rows = [
        train(mode, epochs, progress=progress)
        for mode in tqdm(("bp", "dfa", "shallow"), desc="demo", disable=not progress)
    ]
    print("\nMLP 64-256-256-256-10 on scikit-learn digits (1347 train / 450 test images)")
    print(f"{'mode':<9}{'test acc':>9}{'ms/step':>9}  backend")
    for r in rows:
        print(f"{r['mode']:<9}{100 * r['test_acc']:>8.1f}%{r['ms_per_step']:>9.2f}  {r['backend']}")
    return rows
