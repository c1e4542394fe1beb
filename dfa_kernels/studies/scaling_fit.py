"""Scaling-law fits for :mod:`dfa_kernels.studies.scaling`: frontiers, power laws, bootstrap, verdicts.

The forms and fitting follow the field's practice (Hoffmann et al. 2022; Besiroglu et al. 2024;
Porian et al. 2024):

- the compute-efficient **frontier** of a method: at each compute budget C (a log-spaced grid),
  the configuration with the lowest validation loss at C FLOPs, and its held-out (test) loss: the
  choice is made on validation, the reported loss is not the one that chose it. Each curve is
  read between its evaluation points by linear interpolation in (log C, log L), never
  extrapolated; a configuration's seeds are averaged. The envelope need not fall monotonically:
  just past the end of a small model's runs only larger models' earlier evaluations cover a
  budget, and they can be worse;
- ``L(C) = E + A * C^-alpha`` fitted to the frontier as ``log L = logaddexp(a - alpha * log C, e)``
  (``A = exp(a)``, ``E = exp(e)``, log C taken relative to a reference compute for conditioning)
  by minimising the **summed** Huber loss (delta = 1e-3) between predicted and observed log-loss
  with L-BFGS-B from a grid of starting points;
- ``L(N, D) = E + A/N^alpha + B/D^beta`` the same way (log-sum-exp of three terms) on the runs'
  final losses;
- **bootstrap** confidence intervals: the configurations of a method are resampled with
  replacement (and, where a configuration has several seeds, its seeds too), the frontier rebuilt
  and refitted; for a pair (BP, DFA variant) each resample pairs one BP refit with
  one DFA refit, giving the crossover compute and the verdict's distribution;
- the **verdict** as paper 2 states it: over the horizon [smallest compute measured, largest
  compute measured x 10^extrapolate], the sign of L_dfa(C) - L_bp(C) at the small end and at the
  large end: (A) DFA better at both, (B) BP better small and DFA at scale, (C) DFA better small and
  BP at scale, (D) BP better at both. Its confidence is the share of bootstrap resamples that give
  the same verdict.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

HUBER_DELTA = 1e-3
VERDICTS = {"A": "DFA always better", "B": "DFA better at scale", "C": "BP better at scale", "D": "BP always better"}


def huber(r: np.ndarray, delta: float = HUBER_DELTA):
    """Huber loss of residuals r and its derivative."""
    a = np.abs(r)
    small = a <= delta
    return np.where(small, 0.5 * r * r, delta * (a - 0.5 * delta)), np.where(small, r, delta * np.sign(r))


# ---------------------------------------------------------------- frontier
@dataclasses.dataclass(frozen=True)
class Curve:
    """One configuration's runs (one row per seed), evaluated at the same computes."""

    compute: np.ndarray  # [points], increasing
    select: np.ndarray  # [seeds, points]: the loss that picks a configuration (validation)
    report: np.ndarray  # [seeds, points]: the loss reported for it (held out)


def curve(points, report=None) -> Curve:
    """A Curve from one run's [(compute, loss), ...] (reported on the same loss unless `report`
    gives other losses for the same points)."""
    pts = sorted(
        (float(c), float(l), float(r))
        for (c, l), r in zip(points, report if report is not None else [l for _, l in points])
        if c > 0 and l > 0 and r > 0
    )
    c, l, r = (np.array([p[k] for p in pts]) for k in range(3))
    return Curve(c, l[None], r[None])


def seeds_curve(runs_points) -> Curve:
    """A Curve from several seeds' runs of one configuration: [[(compute, select, report), ...], ...]
    with the same computes in every run."""
    rows = [sorted(points) for points in runs_points]
    return Curve(
        np.array([p[0] for p in rows[0]], float),
        np.array([[p[1] for p in r] for r in rows], float),
        np.array([[p[2] for p in r] for r in rows], float),
    )


def frontier(curves, grid: np.ndarray, seeds=None) -> tuple[np.ndarray, np.ndarray]:
    """(compute, reported loss) of the envelope of `curves` at the budgets of `grid` that at least
    one curve covers: at each budget the curve lowest on its selection loss. seeds: per curve the
    seed rows to average (a bootstrap's draw); default every row."""
    log_grid = np.log(grid)
    best, reported = np.full(len(grid), np.inf), np.full(len(grid), np.nan)
    for k, cv in enumerate(curves):
        if len(cv.compute) == 0:
            continue
        rows = slice(None) if seeds is None else seeds[k]
        x = np.log(cv.compute)
        inside = np.nonzero((log_grid >= x[0] - 1e-9) & (log_grid <= x[-1] + 1e-9))[0]
        if len(inside) == 0:
            continue
        sel = np.interp(log_grid[inside], x, np.log(cv.select[rows].mean(0)))
        better = sel < best[inside]
        best[inside[better]] = sel[better]
        reported[inside[better]] = np.interp(log_grid[inside[better]], x, np.log(cv.report[rows].mean(0)))
    keep = np.isfinite(best)
    return grid[keep], np.exp(reported[keep])


def budget_grid(curves, points: int = 24) -> np.ndarray:
    """`points` log-spaced budgets from the smallest to the largest compute of the curves."""
    lo = min(cv.compute[0] for cv in curves if len(cv.compute))
    hi = max(cv.compute[-1] for cv in curves if len(cv.compute))
    return np.exp(np.linspace(math.log(lo), math.log(hi), points))


def rises(compute, loss) -> list[dict]:
    """Where a frontier goes up with compute (see the module doc): each rise's budgets and size."""
    return [
        {"from_flops": float(compute[i]), "to_flops": float(compute[i + 1]), "rise": float(loss[i + 1] - loss[i])}
        for i in range(len(loss) - 1)
        if loss[i + 1] > loss[i]
    ]


# ---------------------------------------------------------------- L(C) = E + A C^-alpha
def _lse_objective(params, log_x: np.ndarray, log_y: np.ndarray):
    """Summed Huber loss of log L = logsumexp(a_i - alpha_i * log_x[:, i], e) and its gradient;
    params = (a_1, alpha_1, ..., a_k, alpha_k, e)."""
    k = log_x.shape[1]
    terms = np.empty((len(log_y), k + 1))
    terms[:, :k] = params[0 : 2 * k : 2] - params[1 : 2 * k : 2] * log_x
    terms[:, k] = params[-1]
    top = terms.max(1, keepdims=True)
    weights = np.exp(terms - top)
    total = weights.sum(1)
    loss, dloss = huber(top[:, 0] + np.log(total) - log_y)
    share = weights * (dloss / total)[:, None]  # d loss / d term
    grad = np.empty_like(params)
    grad[0 : 2 * k : 2] = share[:, :k].sum(0)
    grad[1 : 2 * k : 2] = -(share[:, :k] * log_x).sum(0)
    grad[-1] = share[:, k].sum()
    return loss.sum(), grad


def _power_law_objective(params, log_x: np.ndarray, log_y: np.ndarray):
    """_lse_objective for one term, log L = logaddexp(a - alpha * log_x, e): the bootstrap runs it
    some 10^5 times per method, at half the general form's cost."""
    a, alpha, e = params
    t = a - alpha * log_x
    top = np.maximum(t, e)
    wt, we = np.exp(t - top), np.exp(e - top)
    total = wt + we
    loss, dloss = huber(top + np.log(total) - log_y)
    st, se = wt * dloss / total, we * dloss / total
    return loss.sum(), np.array([st.sum(), -(st * log_x).sum(), se.sum()])


def one_blas_thread():
    """L-BFGS-B's tiny BLAS calls gain nothing from threads and, on a busy CPU, lose 30x to their
    contention: every fit runs inside this."""
    return threadpool_limits(1)


def _fit_lse(objective, log_x, log_y, starts, bounds):
    best = None
    for start in starts:
        res = minimize(
            objective,
            np.asarray(start, float),
            args=(log_x, log_y),
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"maxiter": 500, "ftol": 1e-12, "gtol": 1e-9},
        )
        if best is None or res.fun < best.fun:
            best = res
    return best


EXPONENT_BOUNDS = (0.0, 3.0)
LOG_E_BOUNDS = (math.log(1e-3), math.log(1e3))


def power_law_starts(log_y: np.ndarray) -> list[tuple[float, float, float]]:
    """A grid of (a, alpha, e) starting points for L(C), around the data's loss range."""
    lo, hi = float(log_y.min()), float(log_y.max())
    return [
        (a, alpha, e)
        for a in (lo - 2, lo, hi, hi + 1)
        for alpha in (0.05, 0.15, 0.4, 1.0)
        for e in (lo - 3, lo - 1, lo - 0.3, lo - 0.05)
    ]


def fit_power_law(compute, loss, reference: float | None = None, starts=None) -> dict:
    """Fit L(C) = E + A * C^-alpha (log-sum-exp form, summed Huber on log-loss, multi-start).

    reference: the compute C0 that log C is taken relative to (default: the geometric mean of
    `compute`); A is reported for C in FLOPs. Returns alpha, E, A, the objective and a callable
    ``predict(C)``."""
    compute, loss = np.asarray(compute, float), np.asarray(loss, float)
    if len(compute) < 4:
        raise ValueError(f"a power-law fit needs at least 4 points; got {len(compute)}")
    c0 = float(np.exp(np.log(compute).mean())) if reference is None else float(reference)
    log_x, log_y = np.log(compute / c0), np.log(loss)
    with one_blas_thread():
        res = _fit_lse(
            _power_law_objective,
            log_x,
            log_y,
            starts or power_law_starts(log_y),
            [(None, None), EXPONENT_BOUNDS, LOG_E_BOUNDS],
        )
    a, alpha, e = (float(v) for v in res.x)
    return law(alpha, math.exp(e), math.exp(a) * c0**alpha, objective=float(res.fun), reference=c0, raw=(a, alpha, e))


def law(alpha: float, E: float, A: float, **extra) -> dict:
    return {"alpha": alpha, "E": E, "A": A, **extra}


def predict(fit: dict, compute) -> np.ndarray:
    c = np.asarray(compute, float)
    return fit["E"] + fit["A"] * c ** (-fit["alpha"])


# ---------------------------------------------------------------- L(N, D)
ND_MIN_POINTS = 10


def fit_nd(params, tokens, loss) -> dict:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta (log-sum-exp, summed Huber on log-loss, multi-start)."""
    n, d, l = (np.asarray(v, float) for v in (params, tokens, loss))
    if len(l) < ND_MIN_POINTS or len(set(n)) < 2 or len(set(d)) < 2:
        raise ValueError(
            f"an L(N, D) fit needs at least {ND_MIN_POINTS} points (two per parameter: with fewer "
            f"it interpolates) over at least 2 sizes and 2 token counts; got {len(l)} points, "
            f"{len(set(n))} sizes, {len(set(d))} token counts"
        )
    n0, d0 = float(np.exp(np.log(n).mean())), float(np.exp(np.log(d).mean()))
    log_x, log_y = np.stack([np.log(n / n0), np.log(d / d0)], 1), np.log(l)
    lo, hi = float(log_y.min()), float(log_y.max())
    starts = [
        (a, al, b, be, e)
        for a in (lo - 2, hi)
        for al in (0.1, 0.5)
        for b in (lo - 2, hi)
        for be in (0.1, 0.5)
        for e in (lo - 2, lo - 0.3)
    ]
    with one_blas_thread():
        res = _fit_lse(
            _lse_objective,
            log_x,
            log_y,
            starts,
            [(None, None), EXPONENT_BOUNDS, (None, None), EXPONENT_BOUNDS, LOG_E_BOUNDS],
        )
    a, alpha, b, beta, e = (float(v) for v in res.x)
    return {
        "alpha": alpha,
        "beta": beta,
        "E": math.exp(e),
        "A": math.exp(a) * n0**alpha,
        "B": math.exp(b) * d0**beta,
        "objective": float(res.fun),
        "points": len(l),
    }


# ---------------------------------------------------------------- comparison of two laws
def crossovers(bp: dict, dfa: dict, lo: float, hi: float, points: int = 400) -> list[float]:
    """Computes in [lo, hi] where L_dfa(C) - L_bp(C) changes sign (log-linear interpolation)."""
    grid = np.exp(np.linspace(math.log(lo), math.log(hi), points))
    diff = predict(dfa, grid) - predict(bp, grid)
    found = []
    for i in np.nonzero(np.sign(diff[:-1]) * np.sign(diff[1:]) < 0)[0]:
        t = diff[i] / (diff[i] - diff[i + 1])
        found.append(float(math.exp(math.log(grid[i]) + t * (math.log(grid[i + 1]) - math.log(grid[i])))))
    return found


def verdict(bp: dict, dfa: dict, lo: float, hi: float) -> str:
    """A, B, C or D (see the module doc) for the horizon [lo, hi]."""
    small = float(predict(dfa, lo) - predict(bp, lo)) < 0  # DFA better at the small end
    large = float(predict(dfa, hi) - predict(bp, hi)) < 0  # DFA better at scale
    return {(True, True): "A", (False, True): "B", (True, False): "C", (False, False): "D"}[(small, large)]


# ---------------------------------------------------------------- bootstrap
def interval(values, level: float = 0.95) -> list[float] | None:
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], float)
    if len(values) == 0:
        return None
    q = (1 - level) / 2
    return [float(np.quantile(values, q)), float(np.quantile(values, 1 - q))]


def bootstrap_laws(curves, grid: np.ndarray, full_fit: dict, resamples: int, rng: np.random.Generator) -> list:
    """Refits of L(C) on `resamples` resamplings of the configurations (with replacement, and of
    each one's seeds); None where a resample's frontier has fewer than 4 points."""
    fits = []
    with one_blas_thread():
        for _ in range(resamples):
            pick = rng.integers(0, len(curves), len(curves))
            chosen = [curves[i] for i in pick]
            seeds = [rng.integers(0, len(cv.select), len(cv.select)) for cv in chosen]
            c, l = frontier(chosen, grid, seeds)
            if len(c) < 4:
                fits.append(None)
                continue
            # from the full fit's values (relative to its reference compute) and two grid points
            starts = [full_fit["raw"]] + power_law_starts(np.log(l))[5::27]
            fits.append(fit_power_law(c, l, reference=full_fit["reference"], starts=starts))
    return fits


def compare(bp_fit: dict, dfa_fit: dict, bp_boot: list, dfa_boot: list, lo: float, hi: float) -> dict:
    """The verdict, crossover and exponent difference of a DFA variant against BP, with their
    bootstrap distributions (resample i of BP paired with resample i of the variant)."""
    point = verdict(bp_fit, dfa_fit, lo, hi)
    cross = crossovers(bp_fit, dfa_fit, lo, hi)
    votes, boot_cross, d_alpha, d_e = {k: 0 for k in VERDICTS}, [], [], []
    for b, d in zip(bp_boot, dfa_boot):
        if b is None or d is None:
            continue
        votes[verdict(b, d, lo, hi)] += 1
        c = crossovers(b, d, lo, hi)
        boot_cross.append(c[0] if c else None)
        d_alpha.append(d["alpha"] - b["alpha"])
        d_e.append(d["E"] - b["E"])
    n = sum(votes.values())
    with_cross = [c for c in boot_cross if c is not None]
    return {
        "verdict": point,
        "verdict_meaning": VERDICTS[point],
        "confidence": votes[point] / n if n else None,
        "bootstrap_verdicts": {k: v / n for k, v in votes.items()} if n else None,
        "crossover_flops": cross[0] if cross else None,
        "crossovers_flops": cross,
        "crossover_ci": interval(with_cross),
        "crossover_share": len(with_cross) / n if n else None,
        "alpha_difference": dfa_fit["alpha"] - bp_fit["alpha"],
        "alpha_difference_ci": interval(d_alpha),
        "E_difference": dfa_fit["E"] - bp_fit["E"],
        "E_difference_ci": interval(d_e),
        "horizon_flops": [lo, hi],
        "resamples_used": n,
    }
