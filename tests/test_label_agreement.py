"""Agreement statistics against hand-computed numbers, published values and naive reference loops."""

from __future__ import annotations

import itertools
import random

import pytest

from rlhfkit.label.agreement import (
    cohen_kappa,
    krippendorff_alpha,
    majority,
    pairwise_kappas,
    position_bias,
    ranking_pairs,
    ranking_units,
)


def table_pairs(table: dict[tuple[object, object], int]) -> list[tuple[object, object]]:
    """A contingency table {(rater1, rater2): count} -> the list of label pairs."""
    return [pair for pair, count in table.items() for _ in range(count)]


# ---------------------------------------------------------------- Cohen's kappa, nominal


def test_kappa_classic_2x2():
    # 50 items: 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no.
    # p_o = (20 + 15) / 50 = 0.7; rater 1 says yes 25/50 = 0.5, rater 2 says yes 30/50 = 0.6
    # p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5; kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4
    pairs = table_pairs({("yes", "yes"): 20, ("yes", "no"): 5, ("no", "yes"): 10, ("no", "no"): 15})
    assert cohen_kappa(pairs) == pytest.approx(0.4)


def test_kappa_perfect_agreement_is_one():
    # p_o = 1, p_e = 0.5^2 + 0.25^2 + 0.25^2 = 0.375 < 1 -> kappa = (1 - 0.375) / (1 - 0.375) = 1
    assert cohen_kappa([("a", "a"), ("a", "a"), ("b", "b"), ("c", "c")]) == 1.0


def test_kappa_below_chance_is_negative():
    # 10 items: 2 yes/yes, 3 yes/no, 3 no/yes, 2 no/no. p_o = 4/10 = 0.4; both raters say yes 5/10
    # p_e = 0.5 * 0.5 + 0.5 * 0.5 = 0.5; kappa = (0.4 - 0.5) / 0.5 = -0.2
    pairs = table_pairs({("yes", "yes"): 2, ("yes", "no"): 3, ("no", "yes"): 3, ("no", "no"): 2})
    assert cohen_kappa(pairs) == pytest.approx(-0.2)


def test_kappa_undefined_is_none():
    # no pairs; or one category used by both raters: p_e = 1, so (p_o - p_e) / (1 - p_e) = 0 / 0
    assert cohen_kappa([]) is None
    assert cohen_kappa([("yes", "yes")] * 5) is None
    assert cohen_kappa([(2, 2)] * 3, weights="quadratic") is None
    # one rater constant but the other not is defined: p_o = p_e = 2/3 -> kappa = 0
    assert cohen_kappa([("a", "a"), ("a", "a"), ("a", "b")]) == 0.0


def test_kappa_rejects_bad_arguments():
    with pytest.raises(ValueError, match="weights"):
        cohen_kappa([(1, 1)], weights="cubic")
    with pytest.raises(ValueError, match="numeric"):
        cohen_kappa([("low", "high")], weights="linear")
    with pytest.raises(ValueError, match="not in categories"):
        cohen_kappa([("low", "top")], categories=["low", "high"])


# ---------------------------------------------------------------- Cohen's kappa, weighted

# Rater 1 in rows, rater 2 in columns, categories 1, 2, 3; n = 20.
#          1  2  3 | rows
#     1  [ 5, 2, 1 ]   8
#     2  [ 1, 4, 1 ]   6
#     3  [ 0, 2, 4 ]   6
#  cols    6  8  6
THREE = {(1, 1): 5, (1, 2): 2, (1, 3): 1, (2, 1): 1, (2, 2): 4, (2, 3): 1, (3, 1): 0, (3, 2): 2, (3, 3): 4}


def naive_kappa(pairs, distance):
    """1 - mean_i w(a_i, b_i) / mean_{i,j} w(a_i, b_j): chance pairs rater 1's item i with rater 2's item j."""
    n = len(pairs)
    observed = sum(distance(a, b) for a, b in pairs) / n
    expected = sum(distance(a, b) for a, _ in pairs for _, b in pairs) / n**2
    return 1 - observed / expected


def test_weighted_kappa_three_categories():
    pairs = table_pairs(THREE)
    # Cells 1 apart: (1,2) 2 + (2,1) 1 + (2,3) 1 + (3,2) 2 = 6 items; 2 apart: (1,3) 1 + (3,1) 0 = 1 item.
    # Chance (rows x cols) 1 apart: 8*8 + 6*6 + 6*6 + 6*8 = 184; 2 apart: 8*6 + 6*6 = 84 (over n^2 = 400).
    # linear:    D_o = (6*1 + 1*2) / 20 = 0.4,  D_e = (184*1 + 84*2) / 400 = 0.88, kappa = 1 - 0.4/0.88 = 6/11
    # quadratic: D_o = (6*1 + 1*4) / 20 = 0.5,  D_e = (184*1 + 84*4) / 400 = 1.3,  kappa = 1 - 0.5/1.3 = 8/13
    # nominal:   p_o = 13/20 = 0.65, p_e = (8*6 + 6*8 + 6*6) / 400 = 0.33, kappa = 0.32 / 0.67 = 32/67
    assert cohen_kappa(pairs, weights="linear") == pytest.approx(6 / 11)
    assert cohen_kappa(pairs, weights="quadratic") == pytest.approx(8 / 13)
    assert cohen_kappa(pairs) == pytest.approx(32 / 67)
    assert naive_kappa(pairs, lambda a, b: abs(a - b)) == pytest.approx(6 / 11)
    assert naive_kappa(pairs, lambda a, b: (a - b) ** 2) == pytest.approx(8 / 13)
    assert naive_kappa(pairs, lambda a, b: float(a != b)) == pytest.approx(32 / 67)


def test_weighted_kappa_categories_give_the_order():
    # The same table with named categories: distances are differences of indices in `categories`.
    names = {1: "low", 2: "mid", 3: "high"}
    pairs = [(names[a], names[b]) for a, b in table_pairs(THREE)]
    order = ["low", "mid", "high"]
    assert cohen_kappa(pairs, "linear", order) == pytest.approx(6 / 11)
    assert cohen_kappa(pairs, "quadratic", order) == pytest.approx(8 / 13)
    assert cohen_kappa(pairs, "none", order) == pytest.approx(32 / 67)


def test_weighted_kappa_matches_naive_loop_on_random_data():
    # Numeric labels with a gap (no 3): distances use the values themselves, as the naive loop does.
    rng = random.Random(0)
    scale = [1, 2, 4, 5]
    for _ in range(20):
        pairs = []
        for _ in range(rng.randint(2, 40)):
            a = rng.choice(scale)
            pairs.append((a, a if rng.random() < 0.5 else rng.choice(scale)))
        if len({v for pair in pairs for v in pair}) < 2:
            continue
        assert cohen_kappa(pairs, "linear") == pytest.approx(naive_kappa(pairs, lambda a, b: abs(a - b)))
        assert cohen_kappa(pairs, "quadratic") == pytest.approx(naive_kappa(pairs, lambda a, b: (a - b) ** 2))
        assert cohen_kappa(pairs) == pytest.approx(naive_kappa(pairs, lambda a, b: float(a != b)))


# ---------------------------------------------------------------- Krippendorff's alpha

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers, 12 units,
# None = missing. Published: nominal 0.743, ordinal 0.815, interval 0.849.
RELIABILITY_DATA = {
    "A": [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    "B": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    "C": [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    "D": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
}
# one list per unit (column), missing values dropped; unit 12 has a single value and is not pairable
UNITS = [[row[u] for row in RELIABILITY_DATA.values() if row[u] is not None] for u in range(12)]


def naive_alpha(units, delta2):
    """alpha = 1 - D_o / D_e straight from the value pairs, without a coincidence matrix.

    D_o = (1/n) sum_u 1/(m_u - 1) sum_{i != j in u} delta2(v_i, v_j)      (pairs within units)
    D_e = 1/(n (n - 1)) sum_{i != j over all n pairable values} delta2(v_i, v_j)
    """
    pairable = [unit for unit in units if len(unit) >= 2]
    values = [v for unit in pairable for v in unit]
    n = len(values)
    d_o = (
        sum(
            sum(delta2(a, b) for a, b in itertools.permutations(unit, 2)) / (len(unit) - 1)
            for unit in pairable
        )
        / n
    )
    d_e = sum(delta2(a, b) for a, b in itertools.permutations(values, 2)) / (n * (n - 1))
    return 1 - d_o / d_e, values


def naive_ordinal_delta2(values):
    """Ordinal delta2(c, k) = (#values with c <= v <= k - (#c + #k) / 2)^2, counted from the value list."""

    def delta2(c, k):
        low, high = min(c, k), max(c, k)
        between = sum(1 for v in values if low <= v <= high)
        return (between - (values.count(c) + values.count(k)) / 2) ** 2

    return delta2


def test_alpha_krippendorff_2011_example_by_hand():
    # Pairable values: n = 40 with n_1 = 9, n_2 = 13, n_3 = 10, n_4 = 5, n_5 = 3 (units 1-11).
    # Disagreeing units: u2 = {2,2,2,3} (m=4), u6 = {1,2,3,4} (m=4), u8 = {1,1,2,1} (m=4); all others agree.
    # nominal:  sum o_ck (c != k) = 6/3 + 12/3 + 6/3 = 8;  sum n_c n_k (c != k) = 40^2 - (81+169+100+25+9) = 1216
    #           alpha = 1 - 39 * 8 / 1216 = 0.74342
    # interval: observed = 6*1/3 + 2*(1+4+9+1+4+1)/3 + 6*1/3 = 52/3
    #           expected = 2 * sum_{c<k} n_c n_k (c-k)^2 = 2 * 2240 = 4480;  alpha = 1 - 39 * (52/3) / 4480 = 0.84911
    # ordinal:  delta2(1,2) = (22 - 11)^2 = 121, delta2(2,3) = (23 - 11.5)^2 = 132.25, ... (n_g cumulated)
    #           observed = 6*132.25/3 + 2*(121+506.25+900+132.25+361+56.25)/3 + 6*121/3 = 264.5 + 1384.5 + 242 = 1891
    #           expected = 2 * 199740 = 399480;  alpha = 1 - 39 * 1891 / 399480 = 0.81539
    assert krippendorff_alpha(UNITS, "nominal") == pytest.approx(1 - 39 * 8 / 1216)
    assert krippendorff_alpha(UNITS, "interval") == pytest.approx(1 - 39 * (52 / 3) / 4480)
    assert krippendorff_alpha(UNITS, "ordinal") == pytest.approx(1 - 39 * 1891 / 399480)
    # the published, rounded values
    assert round(krippendorff_alpha(UNITS, "nominal"), 3) == 0.743
    assert round(krippendorff_alpha(UNITS, "ordinal"), 3) == 0.815
    assert round(krippendorff_alpha(UNITS, "interval"), 3) == 0.849


def test_alpha_matches_naive_pairwise_computation():
    nominal, values = naive_alpha(UNITS, lambda a, b: float(a != b))
    interval, _ = naive_alpha(UNITS, lambda a, b: float(a - b) ** 2)
    ordinal, _ = naive_alpha(UNITS, naive_ordinal_delta2(values))
    assert len(values) == 40
    assert round(nominal, 3) == 0.743 and round(interval, 3) == 0.849 and round(ordinal, 3) == 0.815
    assert krippendorff_alpha(UNITS, "nominal") == pytest.approx(nominal)
    assert krippendorff_alpha(UNITS, "interval") == pytest.approx(interval)
    assert krippendorff_alpha(UNITS, "ordinal") == pytest.approx(ordinal)


def test_alpha_random_data_matches_naive():
    rng = random.Random(1)
    for _ in range(20):
        units = [
            [rng.choice([1, 2, 3, 5]) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(2, 12))
        ]
        pairable = [v for unit in units if len(unit) >= 2 for v in unit]
        if len(set(pairable)) < 2:
            continue
        for metric, delta2 in [
            ("nominal", lambda a, b: float(a != b)),
            ("interval", lambda a, b: float(a - b) ** 2),
            ("ordinal", naive_ordinal_delta2(pairable)),
        ]:
            assert krippendorff_alpha(units, metric) == pytest.approx(naive_alpha(units, delta2)[0])


def test_alpha_accepts_a_dict_and_none_as_missing():
    # A dict of unit -> values, with the missing values left in as None, gives the same alpha.
    by_unit = {f"u{u + 1}": [row[u] for row in RELIABILITY_DATA.values()] for u in range(12)}
    assert krippendorff_alpha(by_unit) == pytest.approx(krippendorff_alpha(UNITS))


def test_alpha_perfect_agreement_single_values_and_undefined():
    # Perfect agreement: no within-unit disagreement, D_o = 0 -> alpha = 1 (D_e > 0: two values occur).
    assert krippendorff_alpha([["a", "a"], ["b", "b", "b"]]) == 1.0
    assert krippendorff_alpha([[1, 1], [3, 3]], "interval") == 1.0
    # Single-value units are not pairable and change nothing (nor do empty ones).
    assert krippendorff_alpha(UNITS + [[9], [], [None, 7]], "interval") == krippendorff_alpha(
        UNITS, "interval"
    )
    # Undefined: no pairable values, or all pairable values the same (D_e = 0).
    assert krippendorff_alpha([]) is None
    assert krippendorff_alpha([[1], [2], [3]]) is None
    assert krippendorff_alpha([["x", "x"], ["x", "x", "x"], ["y"]]) is None
    with pytest.raises(ValueError, match="metric"):
        krippendorff_alpha(UNITS, "ratio")
    with pytest.raises(ValueError, match="numeric"):
        krippendorff_alpha([["a", "b"]], "interval")


# ---------------------------------------------------------------- majority, pairwise kappas


def test_majority_and_ties():
    assert majority(["a", "b", "a"]) == ("a", pytest.approx(2 / 3))  # 2 of 3
    assert majority(["a"]) == ("a", 1.0)
    assert majority(["a", "b"]) == (None, 0.5)  # tie 1-1, share 1/2
    assert majority(["a", "a", "b", "b", "c"]) == (None, pytest.approx(0.4))  # tie 2-2, share 2/5
    assert majority([]) == (None, 0.0)


def test_pairwise_kappas_partial_overlap():
    labels = {
        ("alice", "u1"): "yes", ("alice", "u2"): "yes", ("alice", "u3"): "no", ("alice", "u4"): "no",
        ("bob", "u2"): "yes", ("bob", "u3"): "no", ("bob", "u4"): "yes", ("bob", "u5"): "no",
        ("carol", "u4"): "no", ("carol", "u5"): "no", ("carol", "u6"): "yes",
        ("dave", "u9"): "yes",  # shares no unit with anyone: appears in no pair
    }  # fmt: skip
    result = pairwise_kappas(labels)
    assert list(result) == [("alice", "bob"), ("alice", "carol"), ("bob", "carol")]
    # alice-bob on u2, u3, u4: (yes,yes), (no,no), (no,yes). p_o = 2/3; alice yes 1/3, bob yes 2/3
    # p_e = 1/3 * 2/3 + 2/3 * 1/3 = 4/9; kappa = (2/3 - 4/9) / (5/9) = 0.4
    assert result["alice", "bob"] == (pytest.approx(0.4), 3)
    # alice-carol on u4 only: (no,no), a single category -> undefined
    assert result["alice", "carol"] == (None, 1)
    # bob-carol on u4, u5: (yes,no), (no,no). p_o = 1/2; carol always no: p_e = 1/2 * 1 = 1/2 -> kappa = 0
    assert result["bob", "carol"] == (0.0, 2)


# ---------------------------------------------------------------- rankings, position bias


def test_ranking_pairs_and_units():
    # Ranking best to worst: candidate 2, then 0, then 1.
    assert ranking_pairs([2, 0, 1]) == [(2, 0), (2, 1), (0, 1)]
    # (0,1): 0 above 1 -> 1; (0,2): 2 above 0 -> 0; (1,2): 2 above 1 -> 0
    assert ranking_units([2, 0, 1]) == {(0, 1): 1, (0, 2): 0, (1, 2): 0}
    assert ranking_units([0, 1, 2]) == {(0, 1): 1, (0, 2): 1, (1, 2): 1}
    assert ranking_pairs([3]) == [] and ranking_units([]) == {}
    with pytest.raises(ValueError, match="once"):
        ranking_pairs([0, 1, 0])


def test_rankings_feed_kappa_and_alpha():
    # Two annotators rank the same 3 candidates on 2 prompts; units are (prompt, i, j).
    x = {"p1": [0, 1, 2], "p2": [2, 1, 0]}
    y = {"p1": [0, 2, 1], "p2": [2, 1, 0]}
    units = {
        (prompt, *pair): [ranking_units(x[prompt])[pair], ranking_units(y[prompt])[pair]]
        for prompt in x
        for pair in ranking_units(x[prompt])
    }
    # p1: x 1,1,1 vs y 1,1,0; p2: x 0,0,0 vs y 0,0,0 -> pairs (1,1)x2, (1,0), (0,0)x3; n = 6
    # kappa: p_o = 5/6; x: 1 three times, y: 1 twice -> p_e = 3/6*2/6 + 3/6*4/6 = 1/2; kappa = (1/3)/(1/2) = 2/3
    assert cohen_kappa([tuple(v) for v in units.values()]) == pytest.approx(2 / 3)
    # alpha: n = 12 values (n_1 = 5, n_0 = 7); one disagreeing unit, o_01 + o_10 = 2
    # alpha = 1 - 11 * 2 / (2 * 5 * 7) = 1 - 22/70 = 24/35
    assert krippendorff_alpha(units) == pytest.approx(24 / 35)


def test_position_bias():
    assert position_bias(6, 10) == 0.6  # 6 of 10 decided comparisons went to the left answer
    assert position_bias(0, 0) is None
    with pytest.raises(ValueError):
        position_bias(5, 4)
    with pytest.raises(ValueError):
        position_bias(-1, 4)
