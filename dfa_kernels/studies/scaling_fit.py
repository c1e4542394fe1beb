"""Scaling-law fits for :mod:`dfa_kernels.studies.scaling`: frontiers, power laws, bootstrap, verdicts.

The forms and fitting follow the field's practice (Hoffmann et al. 2022; Besiroglu et al. 2024;
Porian et al. 2024):

- the compute-efficient **frontier** of a method: at each compute budget C (a log-spaced grid),
  the lowest validation loss any of its runs reached with C FLOPs, each run's loss curve read
  between its evaluation points by linear interpolation in (log C, log L), never extrapolated;
- ``L(C) = E + A * C^-alpha`` fitted to the frontier as ``log L = logaddexp(a - alpha * log C, e)``
  (``A = exp(a)``, ``E = exp(e)``, log C taken relative to a reference compute for conditioning)
  by minimising the **summed** Huber loss (delta = 1e-3) between predicted and observed log-loss
  with L-BFGS-B from a grid of starting points;
- ``L(N, D) = E + A/N^alpha + B/D^beta`` the same way (log-sum-exp of three terms) on the runs'
  final losses;
- **bootstrap** confidence intervals: the runs of a method are resampled with replacement, the
  frontier rebuilt and refitted; for a pair (BP, DFA variant) each resample pairs one BP refit with
  one DFA refit, giving the crossover compute and the verdict's distribution;
- the **verdict** as paper 2 states it: over the horizon [smallest compute measured, largest
  compute measured x 10^extrapolate], the sign of L_dfa(C) - L_bp(C) at the small end and at the
  large end: (A) DFA better at both, (B) BP better small and DFA at scale, (C) DFA better small and
  BP at scale, (D) BP better at both. Its confidence is the share of bootstrap resamples that give
  the same verdict.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

HUBER_DELTA = 1e-3
VERDICTS = {"A": "DFA always better", "B": "DFA better at scale", "C": "BP better at scale",
            "D": "BP always better"}


def huber(r: np.ndarray, delta: float = HUBER_DELTA):
    """Huber loss of residuals r and its derivative."""
    a = np.abs(r)
    small = a <= delta
    return np.where(small, 0.5 * r * r, delta * (a - 0.5 * delta)), np.where(small, r, delta * np.sign(r))


# ---------------------------------------------------------------- frontier
def run_curve(points) -> tuple[np.ndarray, np.ndarray]:
    """(log C, log L) of one run's evaluation points [(compute, loss), ...], sorted by compute."""
    pts = sorted((float(c), float(l)) for c, l in points if c > 0 and l > 0)
    return np.log([p[0] for p in pts]), np.log([p[1] for p in pts])


def frontier(curves, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(compute, loss) of the envelope of `curves` (from run_curve) at the budgets of `grid` that
    at least one run covers."""
    log_grid = np.log(grid)
    best = np.full(len(grid), np.inf)
    for log_c, log_l in curves:
        if len(log_c) == 0:
            continue
        inside = (log_grid >= log_c[0] - 1e-9) & (log_grid <= log_c[-1] + 1e-9)
        if inside.any():
            best[inside] = np.minimum(best[inside], np.interp(log_grid[inside], log_c, log_l))
    keep = np.isfinite(best)
    return grid[keep], np.exp(best[keep])


def budget_grid(curves, points: int = 24) -> np.ndarray:
    """`points` log-spaced budgets from the smallest to the largest compute of the curves."""
    lo = min(c[0] for c, _ in curves if len(c))
    hi = max(c[-1] for c, _ in curves if len(c))
    return np.exp(np.linspace(lo, hi, points))


# ---------------------------------------------------------------- L(C) = E + A C^-alpha
def _lse_objective(params, log_x: np.ndarray, log_y: np.ndarray):
    """Summed Huber loss of log L = logsumexp(a_i - alpha_i * log_x[:, i], e) and its gradient;
    params = (a_1, alpha_1, ..., a_k, alpha_k, e)."""
    k = log_x.shape[1]
    terms = np.empty((len(log_y), k + 1))
    terms[:, :k] = params[0:2 * k:2] - params[1:2 * k:2] * log_x
    terms[:, k] = params[-1]
    top = terms.max(1, keepdims=True)
    weights = np.exp(terms - top)
    total = weights.sum(1)
    loss, dloss = huber(top[:, 0] + np.log(total) - log_y)
    share = weights * (dloss / total)[:, None]               # d loss / d term
    grad = np.empty_like(params)
    grad[0:2 * k:2] = share[:, :k].sum(0)
    grad[1:2 * k:2] = -(share[:, :k] * log_x).sum(0)
    grad[-1] = share[:, k].sum()
    return loss.sum(), grad


def one_blas_thread():
    """L-BFGS-B's tiny BLAS calls gain nothing from threads and, on a busy CPU, lose 30x to their
    contention: every fit runs inside this."""
    return threadpool_limits(1)


def _fit_lse(log_x, log_y, starts, bounds):
    best = None
    for start in starts:
        res = minimize(_lse_objective, np.asarray(start, float), args=(log_x, log_y), jac=True,
                       method="L-BFGS-B", bounds=bounds, options={"maxiter": 500, "ftol": 1e-12, "gtol": 1e-9})
        if best is None or res.fun < best.fun:
            best = res
    return best


EXPONENT_BOUNDS = (0.0, 3.0)
LOG_E_BOUNDS = (math.log(1e-3), math.log(1e3))


def power_law_starts(log_y: np.ndarray) -> list[tuple[float, float, float]]:
    """A grid of (a, alpha, e) starting points for L(C), around the data's loss range."""
    lo, hi = float(log_y.min()), float(log_y.max())
    return [(a, alpha, e) for a in (lo - 2, lo, hi, hi + 1) for alpha in (0.05, 0.15, 0.4, 1.0)
            for e in (lo - 3, lo - 1, lo - 0.3, lo - 0.05)]


def fit_power_law(compute, loss, reference: float | None = None, starts=None) -> dict:
    """Fit L(C) = E + A * C^-alpha (log-sum-exp form, summed Huber on log-loss, multi-start).

    reference: the compute C0 that log C is taken relative to (default: the geometric mean of
    `compute`); A is reported for C in FLOPs. Returns alpha, E, A, the objective and a callable
    ``predict(C)``."""
    compute, loss = np.asarray(compute, float), np.asarray(loss, float)
    if len(compute) < 4:
        raise ValueError(f"a power-law fit needs at least 4 points; got {len(compute)}")
    c0 = float(np.exp(np.log(compute).mean())) if reference is None else float(reference)
    log_x, log_y = np.log(compute / c0)[:, None], np.log(loss)
    with one_blas_thread():
        res = _fit_lse(log_x, log_y, starts or power_law_starts(log_y),
                       [(None, None), EXPONENT_BOUNDS, LOG_E_BOUNDS])
    a, alpha, e = (float(v) for v in res.x)
    return law(alpha, math.exp(e), math.exp(a) * c0 ** alpha, objective=float(res.fun), reference=c0,
               raw=(a, alpha, e))


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
        raise ValueError(f"an L(N, D) fit needs at least {ND_MIN_POINTS} points (two per parameter: with fewer "
                         f"it interpolates) over at least 2 sizes and 2 token counts; got {len(l)} points, "
                         f"{len(set(n))} sizes, {len(set(d))} token counts")
    n0, d0 = float(np.exp(np.log(n).mean())), float(np.exp(np.log(d).mean()))
    log_x, log_y = np.stack([np.log(n / n0), np.log(d / d0)], 1), np.log(l)
    lo, hi = float(log_y.min()), float(log_y.max())
    starts = [(a, al, b, be, e) for a in (lo - 2, hi) for al in (0.1, 0.5) for b in (lo - 2, hi)
              for be in (0.1, 0.5) for e in (lo - 2, lo - 0.3)]
    with one_blas_thread():
        res = _fit_lse(log_x, log_y, starts, [(None, None), EXPONENT_BOUNDS, (None, None), EXPONENT_BOUNDS,
                                              LOG_E_BOUNDS])
    a, alpha, b, beta, e = (float(v) for v in res.x)
    return {"alpha": alpha, "beta": beta, "E": math.exp(e), "A": math.exp(a) * n0 ** alpha,
            "B": math.exp(b) * d0 ** beta, "objective": float(res.fun), "points": len(l)}


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
    small = float(predict(dfa, lo) - predict(bp, lo)) < 0      # DFA better at the small end
    large = float(predict(dfa, hi) - predict(bp, hi)) < 0      # DFA better at scale
    return {(True, True): "A", (False, True): "B", (True, False): "C", (False, False): "D"}[(small, large)]


# ---------------------------------------------------------------- bootstrap
def interval(values, level: float = 0.95) -> list[float] | None:
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], float)
    if len(values) == 0:
        return None
    q = (1 - level) / 2
    return [float(np.quantile(values, q)), float(np.quantile(values, 1 - q))]


def bootstrap_laws(curves, grid: np.ndarray, full_fit: dict, resamples: int, rng: np.random.Generator) -> list:
    """Refits of L(C) on `resamples` resamplings of the runs (with replacement); None where a
    resample's frontier has fewer than 4 points."""
    fits = []
    with one_blas_thread():
        for _ in range(resamples):
            pick = rng.integers(0, len(curves), len(curves))
            c, l = frontier([curves[i] for i in pick], grid)
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
        "verdict": point, "verdict_meaning": VERDICTS[point],
        "confidence": votes[point] / n if n else None,
        "bootstrap_verdicts": {k: v / n for k, v in votes.items()} if n else None,
        "crossover_flops": cross[0] if cross else None, "crossovers_flops": cross,
        "crossover_ci": interval(with_cross),
        "crossover_share": len(with_cross) / n if n else None,
        "alpha_difference": dfa_fit["alpha"] - bp_fit["alpha"], "alpha_difference_ci": interval(d_alpha),
        "E_difference": dfa_fit["E"] - bp_fit["E"], "E_difference_ci": interval(d_e),
        "horizon_flops": [lo, hi], "resamples_used": n,
    }
