"""Statistics for `rlhfkit eval`: confidence intervals, paired win rates, diversity and length bias.

Pure functions of lists or 1-D arrays (numpy only; no models, no torch). The formulas:

    bootstrap_ci             percentile interval of stat over n_boot resamples (with replacement) of the values
    mean_ci                  mean(x) and its bootstrap interval
    paired_win_rate          d_i = tuned_i - base_i; win if d_i > eps, tie if |d_i| <= eps, loss if d_i < -eps
                             win_rate = (wins + ties / 2) / n;  win_rate_no_ties = wins / (wins + losses)
    distinct_n               unique n-grams / total n-grams over all texts (lowercased whitespace tokens)
    length_bias              Pearson and Spearman correlation of score with length
    length_matched_win_rate  paired_win_rate over the prompts with |l_t - l_b| <= tolerance * max(l_t, l_b)
    length_controlled_win_rate  sigmoid(theta_0) of the logistic fit
                             P(win_i) = sigmoid(theta_0 + theta_1 * tanh((l_t - l_b)_i / std(l_t - l_b)))
                             (AlpacaEval 2's length control, Dubois et al. 2024, reduced to its length term)
    summary_stats            mean, std, min, p10, p50, p90, max

Every interval is a percentile bootstrap (Efron & Tibshirani 1993, Ch. 13) with a fixed seed, so a report
is reproducible. Paired statistics resample prompts, keeping each prompt's tuned and base answers together.
Bad input (empty, lengths that differ, non-finite values) is a ValueError that names the argument.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

ArrayLike = Sequence[float] | np.ndarray


def _vector(values: ArrayLike, name: str, func: str, *, allow_empty: bool = False) -> np.ndarray:
    """values as a finite float64 vector (n,), or a ValueError naming `name`."""
    try:
        x = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{func}: {name} must be a list of numbers") from None
    if x.ndim != 1:
        raise ValueError(f"{func}: {name} must be one-dimensional, got shape {x.shape}")
    if not allow_empty and x.size == 0:
        raise ValueError(f"{func}: {name} is empty")
    bad = np.flatnonzero(~np.isfinite(x))
    if bad.size:
        raise ValueError(f"{func}: {name}[{bad[0]}] is {x[bad[0]]} (expected a finite number)")
    return x


def _same_length(func: str, **arrays: np.ndarray) -> None:
    (first, a), *rest = arrays.items()
    for name, b in rest:
        if len(b) != len(a):
            raise ValueError(f"{func}: {name} has {len(b)} values but {first} has {len(a)} (one per prompt)")


def _check_interval(func: str, n_boot: int, level: float) -> None:
    if n_boot < 1:
        raise ValueError(f"{func}: n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"{func}: level must be in (0, 1), got {level}")


def _resample_stats(x: np.ndarray, stat: Callable[..., Any], n_boot: int, seed: int) -> np.ndarray:
    """stat of n_boot resamples of x, (n_boot,). Tries stat(samples, axis=1) in chunks of about a million
    values (np.mean, np.median, ...); a stat without `axis` is called once per resample."""
    rng = np.random.default_rng(seed)
    n = len(x)
    chunk = max(1, 1_000_000 // n)
    out = np.empty(n_boot)
    vectorized = True
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))  # (b, n)
        samples = x[idx]
        if vectorized:
            try:
                got = np.asarray(stat(samples, axis=1), dtype=np.float64)
                vectorized = got.shape == (len(samples),)
            except (TypeError, ValueError):  # no axis argument, or one that wants a 1-D input
                vectorized = False
        if not vectorized:
            got = np.array([float(stat(s)) for s in samples])
        out[start : start + len(samples)] = got
    return out


def bootstrap_ci(values: ArrayLike, stat: Callable[..., Any] = np.mean, n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval (lo, hi) of stat(values).

        theta*_b = stat(x*_b),  x*_b = n values drawn with replacement from x,  b = 1..n_boot
        lo, hi   = quantiles (1 - level) / 2 and (1 + level) / 2 of theta*

    Constant values give lo == hi == that value. Deterministic for a given seed.
    """
    x = _vector(values, "values", "bootstrap_ci")
    _check_interval("bootstrap_ci", n_boot, level)
    boots = _resample_stats(x, stat, n_boot, seed)
    lo, hi = np.quantile(boots, [(1.0 - level) / 2, (1.0 + level) / 2])
    return float(lo), float(hi)


def mean_ci(values: ArrayLike, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """{mean, lo, hi, n}: the mean of values and its percentile bootstrap interval (see bootstrap_ci)."""
    x = _vector(values, "values", "mean_ci")
    lo, hi = bootstrap_ci(x, np.mean, n_boot=n_boot, level=level, seed=seed)
    return {"mean": float(x.mean()), "lo": lo, "hi": hi, "n": int(len(x))}


def _sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test: P(|W - m/2| >= |wins - m/2|) for W ~ Binomial(m = wins + losses, 1/2)."""
    m = wins + losses
    if m == 0:
        return 1.0
    k = min(wins, losses)
    # P(W <= k), summed in log space so large m does not overflow
    log_terms = [math.lgamma(m + 1) - math.lgamma(i + 1) - math.lgamma(m - i + 1) - m * math.log(2.0)
                 for i in range(k + 1)]
    top = max(log_terms)
    tail = math.exp(top) * sum(math.exp(t - top) for t in log_terms)
    return min(1.0, 2.0 * tail)


def _outcomes(tuned: np.ndarray, base: np.ndarray, tie_eps: float) -> np.ndarray:
    """Per prompt (n,): 1 for a win of tuned, 0.5 for a tie, 0 for a loss."""
    d = tuned - base
    return np.where(d > tie_eps, 1.0, np.where(d < -tie_eps, 0.0, 0.5))


def _win_rate_of(w: np.ndarray, n_boot: int, level: float, seed: int) -> dict[str, Any]:
    wins, losses = int((w == 1.0).sum()), int((w == 0.0).sum())
    ties = len(w) - wins - losses
    lo, hi = bootstrap_ci(w, np.mean, n_boot=n_boot, level=level, seed=seed)
    return {"wins": wins, "ties": ties, "losses": losses, "n": int(len(w)), "win_rate": float(w.mean()),
            "lo": lo, "hi": hi, "win_rate_no_ties": wins / (wins + losses) if wins + losses else None,
            "sign_test_p": _sign_test_p(wins, losses)}


def paired_win_rate(tuned: ArrayLike, base: ArrayLike, tie_eps: float = 1e-9, n_boot: int = 2000, seed: int = 0,
                    level: float = 0.95) -> dict[str, Any]:
    """How often the tuned model's score beats the base model's on the same prompt.

        d_i = tuned_i - base_i:   win if d_i > tie_eps,  tie if |d_i| <= tie_eps,  loss if d_i < -tie_eps
        win_rate         = (wins + 0.5 * ties) / n          (0.5 = no difference)
        win_rate_no_ties = wins / (wins + losses)           (None when every prompt tied)
        lo, hi           = bootstrap interval of win_rate, resampling prompts (pairs stay together)
        sign_test_p      = two-sided exact sign test of wins vs losses (ties dropped)

    Returns {wins, ties, losses, n, win_rate, lo, hi, win_rate_no_ties, sign_test_p}.
    """
    t = _vector(tuned, "tuned", "paired_win_rate")
    b = _vector(base, "base", "paired_win_rate")
    _same_length("paired_win_rate", tuned=t, base=b)
    _check_interval("paired_win_rate", n_boot, level)
    return _win_rate_of(_outcomes(t, b, tie_eps), n_boot, level, seed)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Diversity of a set of answers: unique n-grams / total n-grams, pooled over all texts.

    Tokens are the lowercased whitespace-split words; n-grams never cross from one text to the next.
    0.0 when no text has n tokens. (Li et al. 2016, "A Diversity-Promoting Objective Function", Sec. 4.)
    """
    if isinstance(texts, str):
        raise ValueError("distinct_n: texts must be a list of strings, got one string")
    if len(texts) == 0:
        raise ValueError("distinct_n: texts is empty")
    if n < 1:
        raise ValueError(f"distinct_n: n must be >= 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"distinct_n: texts[{i}] is {type(text).__name__}, expected a string")
        tokens = text.lower().split()
        grams = [tuple(tokens[j : j + n]) for j in range(len(tokens) - n + 1)]
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    ranks = np.empty(len(x))
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + end + 1) / 2.0  # mean of ranks start+1 .. end
            start = end
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    da, db = a - a.mean(), b - b.mean()
    return float(np.clip((da @ db) / math.sqrt((da @ da) * (db @ db)), -1.0, 1.0))


def length_bias(scores: ArrayLike, lengths: ArrayLike) -> dict[str, Any]:
    """How much a score follows answer length (a reward model that pays for length is hackable).

        pearson  = cov(s, l) / (std(s) std(l))
        spearman = pearson of the ranks of s and l (ties get their average rank)

    Returns {pearson, spearman, n, note}. A constant input (or a single value) has no correlation:
    both are 0.0 and `note` says why; otherwise `note` is "".
    """
    s = _vector(scores, "scores", "length_bias")
    n_ = _vector(lengths, "lengths", "length_bias")
    _same_length("length_bias", scores=s, lengths=n_)
    constant = [name for name, x in (("scores", s), ("lengths", n_)) if len(x) < 2 or np.ptp(x) == 0]
    if constant:
        note = f"{' and '.join(constant)} {'is' if len(constant) == 1 else 'are'} constant: no correlation"
        return {"pearson": 0.0, "spearman": 0.0, "n": int(len(s)), "note": note}
    return {"pearson": _pearson(s, n_), "spearman": _pearson(_ranks(s), _ranks(n_)), "n": int(len(s)), "note": ""}


def _paired_lengths(func: str, tuned_scores: ArrayLike, tuned_lengths: ArrayLike, base_scores: ArrayLike,
                    base_lengths: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    arrays = {name: _vector(v, name, func) for name, v in (("tuned_scores", tuned_scores),
              ("tuned_lengths", tuned_lengths), ("base_scores", base_scores), ("base_lengths", base_lengths))}
    _same_length(func, **arrays)
    for name in ("tuned_lengths", "base_lengths"):
        if (arrays[name] < 0).any():
            raise ValueError(f"{func}: {name} has a negative length")
    return arrays["tuned_scores"], arrays["tuned_lengths"], arrays["base_scores"], arrays["base_lengths"]


def length_matched_win_rate(tuned_scores: ArrayLike, tuned_lengths: ArrayLike, base_scores: ArrayLike,
                            base_lengths: ArrayLike, tolerance: float = 0.2, tie_eps: float = 1e-9,
                            n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """paired_win_rate over only the prompts whose two answers have about the same length:

        matched_i = |l_t,i - l_b,i| <= tolerance * max(l_t,i, l_b,i)

    A tuned model that wins only by writing more wins about half of the matched prompts.
    Returns paired_win_rate's keys over the matched prompts (win_rate, lo, hi and win_rate_no_ties are
    None when no prompt matched) plus {matched, total, matched_share, tolerance}.
    """
    if tolerance < 0:
        raise ValueError(f"length_matched_win_rate: tolerance must be >= 0, got {tolerance}")
    _check_interval("length_matched_win_rate", n_boot, level)
    ts, tl, bs, bl = _paired_lengths("length_matched_win_rate", tuned_scores, tuned_lengths, base_scores,
                                     base_lengths)
    keep = np.abs(tl - bl) <= tolerance * np.maximum(tl, bl)
    extra = {"matched": int(keep.sum()), "total": int(len(keep)), "matched_share": float(keep.mean()),
             "tolerance": float(tolerance)}
    if not keep.any():
        return {"wins": 0, "ties": 0, "losses": 0, "n": 0, "win_rate": None, "lo": None, "hi": None,
                "win_rate_no_ties": None, "sign_test_p": 1.0, **extra}
    return {**_win_rate_of(_outcomes(ts[keep], bs[keep], tie_eps), n_boot, level, seed), **extra}


def _logistic_fits(x: np.ndarray, y: np.ndarray, counts: np.ndarray, l2: float,
                   iters: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """(theta_0, theta_1), each (B,), of B weighted logistic fits at once (Newton's method, 2 parameters).

    x, y: (n,) features and soft targets in [0, 1]; counts: (B, n) weight of each prompt in fit b.
    Minimizes sum_i c_bi * CE(y_i, sigmoid(t0 + t1 x_i)) + l2/2 * (t0^2 + t1^2); l2 keeps a perfectly
    separable fit finite.
    """
    t0, t1 = np.zeros(len(counts)), np.zeros(len(counts))
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(t0[:, None] + t1[:, None] * x[None, :])))  # (B, n)
        r, w = counts * (y[None, :] - p), counts * p * (1.0 - p)  # (B, n)
        g0, g1 = r.sum(1) - l2 * t0, r @ x - l2 * t1  # gradient of the penalized log-likelihood, (B,)
        h00, h01, h11 = w.sum(1) + l2, w @ x, w @ (x * x) + l2  # minus its Hessian, (B,)
        det = h00 * h11 - h01 * h01
        s0, s1 = (h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det
        t0, t1 = t0 + s0, t1 + s1
        if max(np.abs(s0).max(), np.abs(s1).max()) < 1e-10:
            break
    return t0, t1


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def length_controlled_win_rate(tuned_scores: ArrayLike, tuned_lengths: ArrayLike, base_scores: ArrayLike,
                               base_lengths: ArrayLike, tie_eps: float = 1e-9, n_boot: int = 1000, seed: int = 0,
                               level: float = 0.95, l2: float = 1e-3) -> dict[str, Any]:
    """The win rate the tuned model would have at equal answer lengths, from a logistic fit over prompts:

        y_i = 1 win, 0.5 tie, 0 loss;   x_i = tanh((l_t,i - l_b,i) / std(l_t - l_b))
        P(y_i = 1) = sigmoid(theta_0 + theta_1 * x_i)        (ties are soft targets 0.5)
        lc_win_rate = sigmoid(theta_0)                       (the fitted win rate at x = 0: equal lengths)

    AlpacaEval 2's length-controlled win rate (Dubois et al. 2024, Eq. 3 with only the length term).
    lo, hi: bootstrap over prompts, refitting on each resample. Returns {lc_win_rate, lo, hi, length_coef
    (theta_1: > 0 when longer answers win more), win_rate (raw, for comparison), n}.
    """
    _check_interval("length_controlled_win_rate", n_boot, level)
    ts, tl, bs, bl = _paired_lengths("length_controlled_win_rate", tuned_scores, tuned_lengths, base_scores,
                                     base_lengths)
    y = _outcomes(ts, bs, tie_eps)  # (n,)
    diff = tl - bl
    sd = diff.std()
    x = np.tanh(diff / sd) if sd > 0 else np.zeros_like(diff)  # (n,)
    n = len(y)
    t0, t1 = _logistic_fits(x, y, np.ones((1, n)), l2)
    # resampling prompts with replacement = a multinomial count per prompt, so refits run as batches
    rng, chunk, parts = np.random.default_rng(seed), max(1, 1_000_000 // n), []
    for start in range(0, n_boot, chunk):
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=min(chunk, n_boot - start)).astype(np.float64)
        parts.append(_sigmoid(_logistic_fits(x, y, counts, l2)[0]))
    boots = np.concatenate(parts)  # (n_boot,)
    lo, hi = np.quantile(boots, [(1.0 - level) / 2, (1.0 + level) / 2])
    return {"lc_win_rate": float(_sigmoid(t0[0])), "lo": float(lo), "hi": float(hi), "length_coef": float(t1[0]),
            "win_rate": float(y.mean()), "n": int(n)}


def summary_stats(values: ArrayLike) -> dict[str, float]:
    """{mean, std, min, p10, p50, p90, max, n}: std is the population std (ddof=0); pXX are linear-
    interpolated percentiles (numpy's default)."""
    x = _vector(values, "values", "summary_stats")
    p10, p50, p90 = np.percentile(x, [10, 50, 90])
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "p10": float(p10),
            "p50": float(p50), "p90": float(p90), "max": float(x.max()), "n": int(len(x))}
