"""Small, explicit statistics: t intervals, percentile bootstrap, ANOVA, Levene, paired tests, Holm.

One rule for every analysis: a test or an interval needs ``MIN_TEST`` seeds in each group it uses;
below that it is not computed (nan, shown as '–') and the tables say so. A std needs 2 values.
Intervals of accuracies are clipped to [0, 100] %."""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

LEVEL = 0.95
BOOTSTRAP = 4000
MIN_TEST = 3   # seeds per group a test or interval needs: with 2, a t interval is ±12.7 std, Levene is
               # degenerate and a t-test has 1 dof
ALPHA = 0.05   # the significance level of every test the analyses report
BOUNDS = (0.0, 100.0)   # accuracy in percent
RULE = (f"Tests and 95 % intervals need ≥ {MIN_TEST} seeds per group; below that they are not computed (–) "
        "and what is shown is indicative. A std needs ≥ 2 values; intervals are clipped to [0, 100] %.")


def mean_ci(x, level: float = LEVEL) -> tuple[float, float, float, float]:
    """(mean, sample std, CI low, CI high) with a Student-t interval clipped to BOUNDS; std is nan
    for n < 2, the CI for n < MIN_TEST."""
    x = np.asarray(x, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan, math.nan
    std = float(x.std(ddof=1))
    if len(x) < MIN_TEST:
        return mean, std, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1)) * std / math.sqrt(len(x))
    return mean, std, max(BOUNDS[0], mean - half), min(BOUNDS[1], mean + half)


def enough(groups: list) -> bool:
    """Whether every group has the seeds a test or an interval needs."""
    return len(groups) > 0 and all(len(g) >= MIN_TEST for g in groups)


def spread(groups: list) -> tuple[float, float]:
    """Range and standard deviation of the group means (the spread a hyperparameter causes)."""
    means = np.array([np.mean(g) for g in groups])
    return float(means.max() - means.min()), float(means.std(ddof=1)) if len(means) > 1 else math.nan


def bootstrap_spread(groups: list, seed: int = 0, n: int = BOOTSTRAP, level: float = LEVEL):
    """Percentile-bootstrap CIs of (range, std) of group means, resampling seeds within each group;
    nan unless every group has MIN_TEST seeds."""
    if not enough(groups):
        return (math.nan, math.nan), (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(g, dtype=float) for g in groups]
    means = np.stack([a[rng.integers(0, len(a), size=(n, len(a)))].mean(axis=1) for a in arrays], axis=1)
    ranges, stds = means.max(axis=1) - means.min(axis=1), means.std(axis=1, ddof=1)
    q = [50 * (1 - level), 50 * (1 + level)]
    return tuple(np.percentile(ranges, q)), tuple(np.percentile(stds, q))


def pooled_std(groups: list) -> float:
    """Within-group (seed) standard deviation pooled over the groups that have ≥ 2 seeds."""
    ss = sum(float(((np.asarray(g) - np.mean(g)) ** 2).sum()) for g in groups if len(g) > 1)
    dof = sum(len(g) - 1 for g in groups if len(g) > 1)
    return math.sqrt(ss / dof) if dof else math.nan


def anova_p(groups: list) -> float:
    """One-way ANOVA p-value: does the group (hyperparameter value) explain more than seed noise?
    nan unless every group has MIN_TEST seeds."""
    if len(groups) < 2 or not enough(groups):
        return math.nan
    if all(np.ptp(g) == 0 for g in groups):   # no seed noise at all: any difference is the effect
        return 0.0 if np.ptp([np.mean(g) for g in groups]) > 0 else 1.0
    return float(stats.f_oneway(*groups).pvalue)


def two_way_anova(cells: dict) -> dict:
    """Two-way ANOVA with interaction of ``cells`` {(a value, b value): values}, every (a, b) a cell:
    {"a": p, "b": p, "ab": p} (main effects Type II, so an unbalanced grid is read right), each
    from an F test against the within-cell (seed) variance. nan unless every cell has MIN_TEST values."""
    if not enough(list(cells.values())):
        return {"a": math.nan, "b": math.nan, "ab": math.nan}
    a_levels = sorted({a for a, _ in cells}, key=str)
    b_levels = sorted({b for _, b in cells}, key=str)
    y = np.concatenate([np.asarray(v, dtype=float) for v in cells.values()])
    rows = [(a, b) for (a, b), v in cells.items() for _ in range(len(v))]
    da = np.array([[a == lv for lv in a_levels[1:]] for a, _ in rows], dtype=float).reshape(len(y), -1)
    db = np.array([[b == lv for lv in b_levels[1:]] for _, b in rows], dtype=float).reshape(len(y), -1)
    dab = np.einsum("ni,nj->nij", da, db).reshape(len(y), -1)
    one = np.ones((len(y), 1))
    rss = {name: _rss(np.hstack(parts), y) for name, parts in
           (("full", (one, da, db, dab)), ("add", (one, da, db)), ("a", (one, da)), ("b", (one, db)))}
    dof_e = len(y) - len(cells)
    effects = {"a": (rss["b"] - rss["add"], da.shape[1]), "b": (rss["a"] - rss["add"], db.shape[1]),
               "ab": (rss["add"] - rss["full"], dab.shape[1])}
    return {k: _f_p(ss, dof, rss["full"], dof_e) for k, (ss, dof) in effects.items()}


def _rss(x, y) -> float:
    """Residual sum of squares of the least-squares fit of ``y`` on the columns of ``x``."""
    beta = np.linalg.lstsq(x, y, rcond=None)[0]
    return float(((y - x @ beta) ** 2).sum())


def _f_p(ss: float, dof: int, rss: float, dof_e: int) -> float:
    """The F test's p of an effect (sum of squares ``ss`` on ``dof``) against the residual."""
    tiny = 1e-12 * max(1.0, rss + abs(ss))
    if rss <= tiny:   # no seed noise at all: any effect is certain, none is no evidence
        return 0.0 if ss > tiny else 1.0
    return float(stats.f.sf(max(ss, 0.0) / dof / (rss / dof_e), dof, dof_e))


def levene_p(groups: list) -> float:
    """Brown–Forsythe (median-centred Levene) test that the groups' variances are equal."""
    groups = [g for g in groups if len(g) >= MIN_TEST]
    if len(groups) < 2:
        return math.nan
    if all(np.ptp(g) == 0 for g in groups):
        return 1.0
    return float(stats.levene(*groups, center="median").pvalue)


def compare(a: dict, b: dict) -> tuple[float, float, str, int]:
    """Is A better than B? ``a``/``b`` map seed -> value. Paired t over shared seeds when there are
    ≥ MIN_TEST of them, else Welch's t (nan when either side has fewer). Returns (mean difference, two-sided p, test name, n)."""
    shared = sorted(set(a) & set(b))
    if len(shared) >= MIN_TEST:
        x, y = np.array([a[s] for s in shared]), np.array([b[s] for s in shared])
        noise = np.ptp(x - y)
        p = float(stats.ttest_rel(x, y).pvalue) if noise else _exact(x, y)
        return float((x - y).mean()), p, "paired t", len(shared)
    x, y = np.array(list(a.values())), np.array(list(b.values()))
    if len(x) < MIN_TEST or len(y) < MIN_TEST:
        return float(x.mean() - y.mean()), math.nan, "—", 0
    p = float(stats.ttest_ind(x, y, equal_var=False).pvalue) if (np.ptp(x) or np.ptp(y)) else _exact(x, y)
    return float(x.mean() - y.mean()), p, "Welch t", min(len(x), len(y))


def _exact(x, y) -> float:
    """The t-test's limit without noise: any difference is certain, none is no evidence."""
    return 0.0 if x.mean() != y.mean() else 1.0


def holm(pvalues: list) -> list:
    """Holm–Bonferroni adjusted p-values (nan stays nan), for the pairs compared at one density."""
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    order = sorted(idx, key=lambda i: pvalues[i])
    out, running = list(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * pvalues[i]))
        out[i] = running
    return out


def p_text(p: float) -> str:
    """A p-value for a table: '< 0.001' rather than a row of zeros; '–' when no test ran."""
    if p is None or math.isnan(p):
        return "–"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def p_relation(p: float) -> str:
    """A p-value after 'p': '< 0.001' or '= 0.042'."""
    text = p_text(p)
    return text if text.startswith("<") else f"= {text}"


def std_bars(means, sd) -> list:
    """Error bars (below, above) of ``means`` ± ``sd``, clipped to BOUNDS; none where ``sd`` is nan
    (a single seed)."""
    means, sd = np.asarray(means, dtype=float), np.asarray(sd, dtype=float)
    return [means - np.clip(means - sd, *BOUNDS), np.clip(means + sd, *BOUNDS) - means]


def value_text(v) -> str:
    """A config value as the tables name it: a float to 4 significant digits, anything else as is."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def fmt(x, digits: int = 2) -> str:
    """A table number; '–' for a missing value."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"
