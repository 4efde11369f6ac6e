"""Inter-annotator agreement: Cohen's kappa, Krippendorff's alpha, majority votes, rankings, position bias.

Pure Python (standard library only), so the labeling app can import it without torch.

Cohen's kappa (two raters, the items both rated; Cohen 1960, weighted: Cohen 1968). With n pairs,
observed pair counts o_ab, and each rater's label counts r_a (rater 1) and c_b (rater 2):

    D_o = sum_ab w(a, b) o_ab / n              observed disagreement
    D_e = sum_ab w(a, b) r_a c_b / n^2         disagreement expected if the raters labeled independently
    kappa = 1 - D_o / D_e

The disagreement weight w is 0 for a == b and otherwise 1 ("none", nominal: this is the familiar
(p_o - p_e) / (1 - p_e)), |x_a - x_b| ("linear") or (x_a - x_b)^2 ("quadratic"), where x is the label
itself (numbers) or its index in `categories`. Kappa does not change when w is scaled, so the usual
division by (k - 1) or (k - 1)^2 is left out. Kappa is undefined (None) with no pairs, or when D_e = 0,
i.e. both raters used one and the same category for every item: perfect agreement, but nothing to tell
apart from chance. 1 is perfect agreement, 0 chance level, below 0 worse than chance.

Krippendorff's alpha (any number of raters, missing values; Krippendorff 2011, "Computing Krippendorff's
Alpha-Reliability"). A unit is the list of values its raters gave it; a unit with m_u >= 2 values is
pairable, others are ignored. The coincidence matrix counts every ordered pair of values from different
raters within a unit, each unit weighted 1 / (m_u - 1) so that it contributes m_u pairable values:

    o_ck = sum_u (number of ordered c-k pairs in u) / (m_u - 1),    n_c = sum_k o_ck,    n = sum_c n_c
    alpha = 1 - D_o / D_e = 1 - (n - 1) * sum_ck o_ck delta2_ck / sum_ck n_c n_k delta2_ck

with the difference function delta2_ck: "nominal" 0 if c == k else 1; "interval" (c - k)^2; "ordinal"
(sum_{g from c to k} n_g - (n_c + n_k) / 2)^2 over the values in sorted order. Alpha is undefined (None)
with no pairable values, or when D_e = 0 (every pairable value is the same).

Rankings: a best-to-worst ranking of candidates implies one (better, worse) pair per pair of candidates
(`ranking_pairs`); `ranking_units` turns it into 0/1 values per unordered candidate pair, which kappa and
alpha can compare as nominal labels.
"""

from __future__ import annotations

import numbers
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence

KAPPA_WEIGHTS = ("none", "linear", "quadratic")
ALPHA_METRICS = ("nominal", "ordinal", "interval")


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real)


def cohen_kappa(
    pairs: Iterable[tuple[Hashable, Hashable]],
    weights: str = "none",
    categories: Sequence[Hashable] | None = None,
) -> float | None:
    """Cohen's kappa of two raters; `pairs[i] = (label by rater 1, label by rater 2)` for one item.

    `weights`: "none" (nominal), "linear" or "quadratic" (weighted kappa). Weighted kappa measures distances
    on the labels themselves, which must then be numbers, unless `categories` gives their order (distance =
    difference of indices). When `categories` is given, every label must be in it. Returns None when kappa is
    undefined: no pairs, or both raters always gave the same single category.
    """
    if weights not in KAPPA_WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(KAPPA_WEIGHTS)}, not {weights!r}")
    pairs = list(pairs)
    if not pairs:
        return None
    observed = Counter(pairs)
    rows = Counter(a for a, _ in pairs)
    cols = Counter(b for _, b in pairs)

    position: Callable[[Hashable], float]
    if categories is not None:
        index = {category: i for i, category in enumerate(categories)}
        if len(index) != len(categories):
            raise ValueError("categories has duplicates")
        unknown = (rows.keys() | cols.keys()) - index.keys()
        if unknown:
            raise ValueError(f"labels not in categories: {sorted(map(repr, unknown))}")
        position = index.__getitem__
    elif weights != "none":
        not_numbers = [label for label in rows.keys() | cols.keys() if not _is_number(label)]
        if not_numbers:
            raise ValueError(
                f"weighted kappa needs numeric labels or `categories` (got {sorted(map(repr, not_numbers))})"
            )
        position = float

    def weight(a: Hashable, b: Hashable) -> float:
        if a == b:
            return 0
        if weights == "none":
            return 1
        gap = position(a) - position(b)
        return abs(gap) if weights == "linear" else gap * gap

    # D_o / D_e = (obs / n) / (exp / n^2) = n * obs / exp
    disagree_observed = sum(count * weight(a, b) for (a, b), count in observed.items())
    disagree_expected = sum(ra * cb * weight(a, b) for a, ra in rows.items() for b, cb in cols.items())
    if disagree_expected == 0:
        return None
    return 1.0 - len(pairs) * disagree_observed / disagree_expected


def krippendorff_alpha(
    units: Mapping[Hashable, Iterable[Hashable]] | Iterable[Iterable[Hashable]],
    metric: str = "nominal",
) -> float | None:
    """Krippendorff's alpha over units (a dict of unit -> values, or a list of value lists).

    Each unit holds the values its raters gave it, one per rater; None values count as missing and units
    with fewer than 2 values are ignored. `metric`: "nominal", "ordinal" (values must sort) or "interval"
    (values must be numbers). Returns None when alpha is undefined: no pairable values, or all the same.
    """
    if metric not in ALPHA_METRICS:
        raise ValueError(f"metric must be one of {', '.join(ALPHA_METRICS)}, not {metric!r}")
    values_per_unit = units.values() if isinstance(units, Mapping) else units

    coincidence: defaultdict[tuple[Hashable, Hashable], float] = defaultdict(float)
    totals: Counter[Hashable] = Counter()  # n_c = sum_k o_ck = pairable occurrences of c
    for unit in values_per_unit:
        counts = Counter(value for value in unit if value is not None)
        m = sum(counts.values())
        if m < 2:
            continue
        totals.update(counts)
        for c, n_c in counts.items():
            for k, n_k in counts.items():
                if c != k:  # same-value pairs have delta2 = 0 under every metric
                    coincidence[c, k] += n_c * n_k / (m - 1)
    n = sum(totals.values())
    if n == 0:
        return None

    delta2: Callable[[Hashable, Hashable], float]
    if metric == "nominal":

        def delta2(c: Hashable, k: Hashable) -> float:
            return 1.0

    elif metric == "interval":
        not_numbers = [value for value in totals if not _is_number(value)]
        if not_numbers:
            raise ValueError(f"interval alpha needs numeric values (got {sorted(map(repr, not_numbers))})")

        def delta2(c: Hashable, k: Hashable) -> float:
            return float(c - k) ** 2  # type: ignore[operator]

    else:
        try:
            ordered = sorted(totals)
        except TypeError as error:
            raise ValueError(f"ordinal alpha needs values that sort: {error}") from None
        rank = {value: i for i, value in enumerate(ordered)}
        cumulative = [0]  # cumulative[i] = sum of n_g over the first i values
        for value in ordered:
            cumulative.append(cumulative[-1] + totals[value])

        def delta2(c: Hashable, k: Hashable) -> float:
            low, high = sorted((rank[c], rank[k]))
            between = cumulative[high + 1] - cumulative[low]  # sum_{g from c to k} n_g
            return (between - (totals[c] + totals[k]) / 2) ** 2

    disagree_observed = sum(o_ck * delta2(c, k) for (c, k), o_ck in coincidence.items())
    disagree_expected = sum(
        n_c * n_k * delta2(c, k) for c, n_c in totals.items() for k, n_k in totals.items() if c != k
    )
    if disagree_expected == 0:
        return None
    return 1.0 - (n - 1) * disagree_observed / disagree_expected


def majority(votes: Iterable[Hashable]) -> tuple[Hashable | None, float]:
    """The most common vote and its share of all votes; (None, share) on a tie for first, (None, 0.0) if none."""
    counts = Counter(votes)
    if not counts:
        return None, 0.0
    (top, top_count), *rest = counts.most_common(2)
    share = top_count / sum(counts.values())
    if rest and rest[0][1] == top_count:
        return None, share
    return top, share


def pairwise_kappas(
    labels: Mapping[tuple[str, Hashable], Hashable],
    weights: str = "none",
    categories: Sequence[Hashable] | None = None,
) -> dict[tuple[str, str], tuple[float | None, int]]:
    """Cohen's kappa for each pair of annotators, from labels keyed (annotator, unit) -> value.

    Keys are (a, b) with a < b; pairs without a common unit are left out. Values are (kappa or None, number
    of common units). `weights` and `categories` are passed to `cohen_kappa`.
    """
    by_annotator: defaultdict[str, dict[Hashable, Hashable]] = defaultdict(dict)
    for (annotator, unit), value in labels.items():
        by_annotator[annotator][unit] = value
    names = sorted(by_annotator)
    result: dict[tuple[str, str], tuple[float | None, int]] = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            labels_b = by_annotator[b]
            pairs = [(value, labels_b[unit]) for unit, value in by_annotator[a].items() if unit in labels_b]
            if pairs:
                result[a, b] = (cohen_kappa(pairs, weights, categories), len(pairs))
    return result


def _check_ranking(ranking: Sequence[int]) -> None:
    if len(set(ranking)) != len(ranking):
        raise ValueError(f"a ranking lists each candidate once: {list(ranking)}")


def ranking_pairs(ranking: Sequence[int]) -> list[tuple[int, int]]:
    """All (better, worse) pairs implied by a best-to-worst ranking of candidate indices, in ranking order."""
    _check_ranking(ranking)
    return [(better, worse) for i, better in enumerate(ranking) for worse in ranking[i + 1 :]]


def ranking_units(ranking: Sequence[int]) -> dict[tuple[int, int], int]:
    """For each candidate pair (i, j) with i < j: 1 if i is ranked above j, else 0 (sorted by pair)."""
    units = {(min(a, b), max(a, b)): int(a < b) for a, b in ranking_pairs(ranking)}
    return dict(sorted(units.items()))


def position_bias(shown_first_chosen: int, decided: int) -> float | None:
    """Share of decided comparisons won by the answer shown first (left); 0.5 is unbiased, None if none."""
    if decided < 0 or not 0 <= shown_first_chosen <= decided:
        raise ValueError(f"need 0 <= shown_first_chosen <= decided, got {shown_first_chosen} and {decided}")
    if decided == 0:
        return None
    return shown_first_chosen / decided
