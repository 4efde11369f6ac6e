"""`rlhfkit eval`'s library: statistics against hand-computed numbers, the HTML report against hostile
text, plots, learning curves from run folders, and control agents from tiny real CartPole runs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from rlhfkit.errors import DataError, RlhfkitError
from rlhfkit.evaluate import plots
from rlhfkit.evaluate.curves import align_curves, first_reaching, pick_metrics, read_curves, value_at
from rlhfkit.evaluate.metrics import (
    _ranks,
    bootstrap_ci,
    distinct_n,
    length_bias,
    length_controlled_win_rate,
    length_matched_win_rate,
    mean_ci,
    paired_win_rate,
    summary_stats,
)
from rlhfkit.evaluate.report import Report, format_value

# ---------------------------------------------------------------- win rates and intervals


def test_paired_win_rate_counts_wins_ties_and_losses_by_hand() -> None:
    # d = tuned - base = [2, 0, -2, 1, -1e-12]: wins at 0 and 3, ties at 1 and 4 (|d| <= 1e-9), a loss at 2
    r = paired_win_rate([3, 2, 1, 5, 4], [1, 2, 3, 4, 4 + 1e-12])
    assert (r["wins"], r["ties"], r["losses"], r["n"]) == (2, 2, 1, 5)
    assert r["win_rate"] == pytest.approx((2 + 0.5 * 2) / 5)  # 0.6
    assert r["win_rate_no_ties"] == pytest.approx(2 / 3)
    assert r["lo"] <= r["win_rate"] <= r["hi"]


def test_a_tuned_model_that_wins_every_prompt_has_a_degenerate_interval_at_one() -> None:
    r = paired_win_rate([2.0] * 10, [1.0] * 10)
    assert (r["win_rate"], r["lo"], r["hi"]) == (1.0, 1.0, 1.0)
    # exact sign test, 10 wins 0 losses: p = 2 * (1/2)^10 = 0.001953125
    assert r["sign_test_p"] == pytest.approx(2 * 0.5**10)
    even = paired_win_rate([1, 0] * 5, [0, 1] * 5)  # 5 wins, 5 losses
    assert even["win_rate"] == 0.5 and even["sign_test_p"] == pytest.approx(1.0)


def test_all_ties_have_no_win_rate_without_ties() -> None:
    r = paired_win_rate([1.0, 2.0], [1.0, 2.0])
    assert r["ties"] == 2 and r["win_rate"] == 0.5 and r["win_rate_no_ties"] is None


def test_the_bootstrap_interval_contains_the_mean_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(0)
    small, large = rng.normal(1.0, 1.0, 20), rng.normal(1.0, 1.0, 2000)
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l
    # the width goes as 1/sqrt(n): 100x the values, about a tenth of the width
    assert 5 < (hi_s - lo_s) / (hi_l - lo_l) < 20
    assert bootstrap_ci(small) == bootstrap_ci(small)  # a fixed seed: the same report twice


def test_the_interval_of_a_constant_is_degenerate() -> None:
    assert bootstrap_ci([3.5] * 7) == (3.5, 3.5)
    assert mean_ci([3.5] * 7) == {"mean": 3.5, "lo": 3.5, "hi": 3.5, "n": 7}


def test_a_statistic_without_an_axis_argument_gives_the_same_interval() -> None:
    x = np.arange(30.0) ** 1.5
    # same seed -> same resamples; np.median runs vectorized, the lambda once per resample
    assert bootstrap_ci(x, np.median, n_boot=300) == bootstrap_ci(x, lambda s: float(np.median(s)), n_boot=300)


def test_summary_stats_by_hand() -> None:
    s = summary_stats(list(range(11)))  # 0..10
    assert (s["mean"], s["min"], s["p10"], s["p50"], s["p90"], s["max"], s["n"]) == (5, 0, 1, 5, 9, 10, 11)
    assert s["std"] == pytest.approx(math.sqrt(10))  # mean of (k - 5)^2 over k = 0..10 is 110 / 11


def test_bad_inputs_are_value_errors_that_name_the_argument() -> None:
    with pytest.raises(ValueError, match="base has 2 values but tuned has 3"):
        paired_win_rate([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="tuned is empty"):
        paired_win_rate([], [])
    with pytest.raises(ValueError, match=r"scores\[1\] is nan"):
        length_bias([1.0, float("nan")], [1, 2])
    with pytest.raises(ValueError, match="base_lengths has 1 values"):
        length_matched_win_rate([1, 2], [1, 2], [1, 2], [1])
    with pytest.raises(ValueError, match="texts is empty"):
        distinct_n([], 1)
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([1, 2], level=1.5)


# ---------------------------------------------------------------- diversity and length


def test_distinct_n_on_hand_strings() -> None:
    texts = ["the cat the cat", "The dog"]
    # unigrams: the cat the cat | the dog -> 6 in all, 3 unique (the, cat, dog)
    assert distinct_n(texts, 1) == pytest.approx(3 / 6)
    # bigrams: (the cat) (cat the) (the cat) | (the dog) -> 4 in all, 3 unique
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    # trigrams: (the cat the) (cat the cat) | none -> 2 of 2
    assert distinct_n(texts, 3) == 1.0
    assert distinct_n(texts, 5) == 0.0  # no text has 5 tokens
    assert distinct_n(["a", "b"], 2) == 0.0  # n-grams never join two texts


def test_ranks_share_ties() -> None:
    assert _ranks(np.array([30.0, 10.0, 20.0, 20.0])).tolist() == [4.0, 1.0, 2.5, 2.5]


def test_a_score_that_is_the_length_has_correlation_one() -> None:
    lengths = [10, 20, 30, 40, 80]
    r = length_bias([float(n) for n in lengths], lengths)
    assert r["pearson"] == pytest.approx(1.0) and r["spearman"] == pytest.approx(1.0) and r["note"] == ""
    squared = length_bias([float(n) ** 2 for n in lengths], lengths)  # monotone, not linear
    assert squared["spearman"] == pytest.approx(1.0) and squared["pearson"] < 0.99


def test_a_constant_input_has_zero_correlation_and_says_why() -> None:
    r = length_bias([2.0, 2.0, 2.0], [1, 5, 9])
    assert (r["pearson"], r["spearman"], r["n"]) == (0.0, 0.0, 3) and "scores is constant" in r["note"]


def _length_hacker() -> tuple[list[float], list[float], list[float], list[float]]:
    """20 prompts, score = length. 10 where tuned writes twice as much (and so wins); 10 of about equal
    length, tuned longer in half of them (100 vs 95) and shorter in the other half (95 vs 100)."""
    tuned_len = [200.0] * 10 + [100.0, 95.0] * 5
    base_len = [100.0] * 10 + [95.0, 100.0] * 5
    return tuned_len, tuned_len, base_len, base_len  # scores are the lengths


def test_a_length_hacker_wins_only_half_of_the_length_matched_prompts() -> None:
    ts, tl, bs, bl = _length_hacker()
    raw = paired_win_rate(ts, bs)
    assert raw["win_rate"] == pytest.approx((10 + 5) / 20)  # 0.75: it looks better than it is
    assert length_bias(ts + bs, tl + bl)["pearson"] == pytest.approx(1.0)
    m = length_matched_win_rate(ts, tl, bs, bl, tolerance=0.2)
    # |200 - 100| = 100 > 0.2 * 200 = 40: not matched; |100 - 95| = 5 <= 0.2 * 100 = 20: matched
    assert (m["matched"], m["total"], m["matched_share"]) == (10, 20, 0.5)
    assert (m["wins"], m["losses"], m["win_rate"]) == (5, 5, 0.5)


def test_no_matched_prompt_gives_no_win_rate() -> None:
    m = length_matched_win_rate([2.0], [200], [1.0], [100], tolerance=0.1)
    assert m["matched"] == 0 and m["n"] == 0 and m["win_rate"] is None and m["lo"] is None


def test_the_length_controlled_win_rate_removes_a_pure_length_effect() -> None:
    rng = np.random.default_rng(1)
    n = 400
    base_len = rng.uniform(50, 150, n)
    tuned_len = np.clip(base_len + rng.normal(30, 40, n), 1, None)  # tuned writes more, on average
    tuned, base = tuned_len + rng.normal(0, 20, n), base_len + rng.normal(0, 20, n)  # score = length + noise
    r = length_controlled_win_rate(tuned, tuned_len, base, base_len, n_boot=300)
    assert r["win_rate"] > 0.65  # raw: mostly wins, by length alone
    assert r["lo"] <= 0.5 <= r["hi"] and abs(r["lc_win_rate"] - 0.5) < 0.08
    assert r["length_coef"] > 1.0  # longer answers win more
    # at equal lengths (x = 0 everywhere) the fit's intercept is the raw win rate (up to the tiny l2)
    same = length_controlled_win_rate(tuned + 10, base_len, base, base_len, n_boot=50)
    assert same["lc_win_rate"] == pytest.approx(same["win_rate"], abs=1e-3) and same["length_coef"] == 0.0


# ---------------------------------------------------------------- report

HOSTILE = {  # raw -> as it must appear in the page
    "<script>alert(1)</script>": "&lt;script&gt;alert(1)&lt;/script&gt;",
    '"><img src=x onerror=alert(1)>': "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;",
}


def test_the_report_escapes_hostile_text_everywhere() -> None:
    png = plots.line_plot({"a": [(0.0, 1.0), (1.0, 2.0)]}, "t", "x", "y")
    for bad, escaped in HOSTILE.items():
        r = Report(bad)
        r.heading(bad)
        r.heading(bad, level=3)
        r.paragraph(bad)
        r.note(bad)
        r.preformatted(bad)
        r.table([bad, "n"], [[bad, 1.5]], caption=bad)
        r.image(png, caption=bad)
        r.samples([{"prompt": bad, bad: bad}], columns=["prompt", bad])
        page = r.html()
        assert bad not in page
        assert "<script" not in page.lower() and "<img src=x" not in page
        assert escaped in page
        assert "http://" not in page and "https://" not in page  # nothing external
    assert ("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">") in page


def test_images_are_embedded_as_data_uris_and_other_bytes_are_refused() -> None:
    r = Report("plots")
    png = plots.histogram({"a": [1.0, 2.0, 2.0]}, "h", "x")
    r.image(png, "a histogram")
    assert '<img src="data:image/png;base64,iVBORw0KGgo' in r.html()  # base64 of the PNG signature
    with pytest.raises(ValueError, match="PNG"):
        r.image(b"<svg onload=alert(1)>", "not a png")


def test_table_cells_are_formatted_and_rows_must_fit_the_columns() -> None:
    cases = {1234567: "1,234,567", 0.123456: "0.1235", 1e-5: "1.000e-05", None: "-", 2048.0: "2,048",
             True: "yes", float("nan"): "nan", 0.0: "0", np.float32(0.5): "0.5", np.int64(7): "7", "x": "x"}
    for value, text in cases.items():
        assert format_value(value) == text, value
    r = Report("t")
    r.table(["a", "b"], [["x", 2.5]])
    assert '<td class="num">2.5</td>' in r.html() and "<td>x</td>" in r.html()
    with pytest.raises(ValueError, match=r"rows\[0\] has 1 cells, expected 2"):
        r.table(["a", "b"], [["only one"]])


def test_samples_keep_their_layout_and_cut_long_text() -> None:
    r = Report("s")
    r.samples([{"base": "a\n  b", "tuned": "x" * 50}], ["base", "tuned", "missing"], max_chars=10)
    page = r.html()
    assert 'class="samples"' in page and "white-space: pre-wrap" in page
    assert "<td>a\n  b</td>" in page and "x" * 10 + "\n[... 40 more characters]" in page


def test_write_replaces_the_file_in_one_rename(tmp_path: Path) -> None:
    r = Report("written")
    r.paragraph("hello")
    out = r.write(tmp_path / "sub" / "report.html")
    assert out.read_text(encoding="utf-8") == r.html()
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temporary left beside it


# ---------------------------------------------------------------- plots


def test_every_plot_returns_png_bytes_and_the_same_input_gives_the_same_bytes() -> None:
    curves = {"a": [[(0.0, 0.0), (10.0, 10.0)], [(2.0, 1.0), (5.0, 2.0), (12.0, 3.0)]], "one": [[(0.0, 1.0)]]}
    pngs = [
        plots.line_plot({"a": [(0.0, 1.0), (1.0, 3.0)], "b": [(0.5, 2.0)]}, "t", "x", "y", reference=2.0),
        plots.band_plot(curves, "t", "x", "y"),
        plots.band_plot(curves, "t", "x", "y", band="std"),
        plots.band_plot({"apart": [[(0.0, 1.0), (1.0, 2.0)], [(5.0, 1.0), (6.0, 2.0)]]}, "t", "x", "y"),
        plots.histogram({"base": [1.0, 2.0, 2.0, 3.0], "tuned": [2.0, 3.0, 3.0, 4.0]}, "t", "x"),
        plots.histogram({"constant": [1.0, 1.0]}, "t", "x"),
        plots.bar_with_ci({"base": mean_ci([1, 2, 3]), "tuned": {"mean": 2.5, "lo": 2.0, "hi": 3.0}}, "t", "y",
                          reference=2.0),
        plots.scatter({"tuned": ([1, 2, 3], [2, 4, 6])}, "t", "x", "y"),
    ]
    assert all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    assert max(len(p) for p in pngs) < 60_000  # small figures keep the report small
    assert plots.band_plot(curves, "t", "x", "y") == pngs[1]


def test_plots_of_nothing_are_value_errors() -> None:
    with pytest.raises(ValueError, match="series is empty"):
        plots.line_plot({}, "t", "x", "y")
    with pytest.raises(ValueError, match=r"bars\['a'\] has no lo"):
        plots.bar_with_ci({"a": {"mean": 1.0, "hi": 2.0}}, "t", "y")


def test_curves_of_several_seeds_are_interpolated_on_the_range_they_share() -> None:
    grid, values = align_curves([[(0, 0), (10, 10)], [(2, 1), (5, 2), (12, 3)]])
    # shared range [2, 10]; grid = the x values inside it: 2, 5 (second curve) and 10 (first)
    assert grid.tolist() == [2.0, 5.0, 10.0]
    assert values[0].tolist() == [2.0, 5.0, 10.0]  # y = x
    # second curve at 10: between (5, 2) and (12, 3), 2 + (10 - 5) / (12 - 5) = 2.714...
    assert values[1].tolist() == pytest.approx([1.0, 2.0, 2 + 5 / 7])
    many, _ = align_curves([[(float(x), 0.0) for x in range(1000)]], points=50)
    assert len(many) == 50 and many[0] == 0 and many[-1] == 999


# ---------------------------------------------------------------- learning curves


def _write(path: Path, lines: list[str], end: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + end, encoding="utf-8")
    return path


def test_read_curves_of_a_hand_written_metrics_file(tmp_path: Path) -> None:
    _write(tmp_path / "metrics.jsonl", [
        json.dumps({"step": 1, "train/loss": 2.0, "train/lr": 0.1, "note": "text", "env_steps": 256}),
        json.dumps({"step": 2, "train/loss": 1.5, "env_steps": 512}),
        '{"step": 3, "train/loss": NaN, "env_steps": 768}',  # a diverged value: left out
        json.dumps({"step": 3, "eval/return": 22.0, "env_steps": 768}),
        "",
        json.dumps({"step": 4, "train/loss": 1.0}),  # no env_steps: only on the step axis
    ])
    curves = read_curves(tmp_path)
    assert curves["train/loss"] == [(1.0, 2.0), (2.0, 1.5), (4.0, 1.0)]
    assert curves["eval/return"] == [(3.0, 22.0)] and "note" not in curves and "step" not in curves
    by_steps = read_curves(tmp_path, x="env_steps")
    assert by_steps["train/loss"] == [(256.0, 2.0), (512.0, 1.5)] and "env_steps" not in by_steps


def test_a_malformed_line_is_an_error_naming_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "metrics.jsonl", ['{"step": 1, "train/loss": 2.0}', '{"step": 2, "train/lo', "[1, 2]",
                                               '{"train/loss": 1.0}', '{"step": 5}'])
    with pytest.raises(DataError) as exc:
        read_curves(tmp_path)
    message = str(exc.value)
    assert f"{path}:2: not valid JSON" in message
    assert f"{path}:3: expected a JSON object, got list" in message
    assert f"{path}:4: field 'step'" in message
    assert len(exc.value.problems) == 3


def test_a_last_line_cut_short_by_a_kill_is_skipped(tmp_path: Path) -> None:
    _write(tmp_path / "metrics.jsonl", ['{"step": 1, "train/loss": 2.0}', '{"step": 2, "train/lo'], end="")
    assert read_curves(tmp_path) == {"train/loss": [(1.0, 2.0)]}


def test_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RlhfkitError, match="no metrics.jsonl .not an rlhfkit run folder"):
        read_curves(tmp_path)
    with pytest.raises(RlhfkitError, match="no such folder"):
        read_curves(tmp_path / "missing")
    with pytest.raises(RlhfkitError, match="is a file"):
        read_curves(_write(tmp_path / "file.txt", ["x"]))


def test_pick_metrics_prefers_returns_rewards_and_losses_and_skips_bookkeeping() -> None:
    two = [(0.0, 1.0), (1.0, 2.0)]
    names = ("train/loss", "eval/return", "episode/return", "time/sps", "train/lr", "train/approx_kl", "eval/return_std",
             "episode/count", "train/entropy", "reward/heldout_accuracy", "eval/min_return", "custom/thing")
    curves = {k: two for k in names}
    curves["train/reward"] = [(0.0, 1.0)]  # one point: nothing to plot
    assert pick_metrics(curves, max_plots=8) == ["eval/return", "eval/min_return", "episode/return",
                                                 "reward/heldout_accuracy", "train/loss", "train/approx_kl",
                                                 "train/entropy", "custom/thing"]
    assert pick_metrics(curves, max_plots=2) == ["eval/return", "eval/min_return"]


def test_value_at_and_first_reaching_read_a_curve_as_logged() -> None:
    curve = [(256.0, 10.0), (512.0, 30.0), (768.0, 25.0)]
    assert value_at(curve, 100) is None and value_at(curve, 600) == 30.0
    assert first_reaching(curve, 25.0) == 512.0 and first_reaching(curve, 31.0) is None


# ---------------------------------------------------------------- control agents (tiny real runs)


def _gym_args(out: Path, *extra: str) -> list[str]:
    return ["env.num_envs=4", "ppo.n_steps=32", "ppo.epochs=2", "ppo.minibatches=2", "progress=false",
            "tensorboard=false", "ppo.total_steps=1024", "eval.every=512", "eval.episodes=2", f"output_dir={out}",
            *extra]


@pytest.fixture(scope="module")
def gym_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three CartPole PPO runs of 1024 steps (about a second each): seeds 1 and 2 of one config, and seed 1
    with another learning rate; and one gym rlhf run of 1024 steps with 20 oracle labels."""
    from rlhfkit.config import load_config
    from rlhfkit.gym.ppo import GymPPOConfig
    from rlhfkit.gym.ppo import train as train_ppo
    from rlhfkit.gym.rlhf import GymRLHFConfig
    from rlhfkit.gym.rlhf import train as train_rlhf

    root = tmp_path_factory.mktemp("gym")
    runs = {"seed1": root / "seed1", "seed2": root / "seed2", "lr": root / "lr", "rlhf": root / "rlhf"}
    train_ppo(load_config(GymPPOConfig, None, _gym_args(runs["seed1"], "seed=1")))
    train_ppo(load_config(GymPPOConfig, None, _gym_args(runs["seed2"], "seed=2")))
    train_ppo(load_config(GymPPOConfig, None, _gym_args(runs["lr"], "seed=1", "ppo.lr=0.001")))
    train_rlhf(load_config(GymRLHFConfig, None, _gym_args(
        runs["rlhf"], "ppo.n_steps=64", "feedback.budget=20", "feedback.initial=10", "reward.epochs=2",
        "reward.hidden=[16]", "eval.every=256")))
    return runs


def test_evaluate_agents_groups_two_seeds_and_sets_apart_another_learning_rate(gym_runs: dict[str, Path]) -> None:
    from rlhfkit.evaluate.agents import evaluate_agents

    dirs = [str(gym_runs[k]) for k in ("seed1", "lr", "seed2")]
    result = evaluate_agents(dirs, episodes=3, seed=123)
    runs, groups = result["runs"], result["groups"]
    assert [r["seed"] for r in runs] == [1, 1, 2] and all(r["env_id"] == "CartPole-v1" for r in runs)
    assert all(r["algo"] == "ppo" and r["final_return"] > 0 for r in runs)
    assert len(groups) == 2
    seeds, lr = (groups[runs[0]["group"]], groups[runs[1]["group"]])
    assert runs[2]["group"] == runs[0]["group"] and seeds["runs"] == [0, 2] and seeds["seeds"] == [1, 2]
    assert lr["n"] == 1 and lr["differs"] == {"ppo.lr": 0.001} and "ppo.lr=0.001" in lr["label"]
    assert seeds["differs"] == {"ppo.lr": 0.0003}
    a, b = runs[0]["final_return"], runs[2]["final_return"]
    assert seeds["final_return_mean"] == pytest.approx((a + b) / 2)
    assert seeds["final_return_std"] == pytest.approx(abs(a - b) / math.sqrt(2))  # ddof=1 with two values
    assert (seeds["final_return_min"], seeds["final_return_max"]) == (min(a, b), max(a, b))
    # training curves on the env-step axis: 8 updates of 4 envs x 32 steps = 128 steps each
    xs = [x for x, _ in runs[0]["train_curve"]]
    assert xs == sorted(xs) and xs[-1] == 1024.0 and runs[0]["env_steps"] == 1024.0
    assert [x for x, _ in runs[0]["eval_curve"]] == [512.0, 1024.0]
    assert runs[0]["wall_seconds"] > 0 and runs[0]["labels"] is None and runs[0]["label_curve"] is None
    # the same episode seeds for every run: the same agent evaluated twice scores the same
    again = evaluate_agents([dirs[0]], episodes=3, seed=123)
    assert again["runs"][0]["final_return"] == a
    json.dumps(result)  # the command can write it as it is


def test_steps_to_threshold_and_training_time_come_from_the_logged_metrics(gym_runs: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    from rlhfkit.evaluate.agents import evaluate_agents

    run = tmp_path / "run"
    shutil.copytree(gym_runs["seed1"], run)
    _write(run / "metrics.jsonl", [
        json.dumps({"step": 1, "episode/return": 10.0, "env_steps": 256.0, "time/train_seconds": 0.5}),
        json.dumps({"step": 2, "episode/return": 30.0, "env_steps": 512.0, "time/train_seconds": 1.0}),
        json.dumps({"step": 2, "eval/return": 50.0, "env_steps": 512.0, "time/train_seconds": 1.0}),
        json.dumps({"step": 3, "episode/return": 60.0, "env_steps": 768.0, "time/train_seconds": 1.5}),
    ])
    r = evaluate_agents([str(run)], episodes=1, threshold=25.0)["runs"][0]
    # training returns 10, 30, 60: first >= 25 at 512 steps; the evaluation (50 at 512) too
    assert (r["steps_to_threshold"], r["eval_steps_to_threshold"], r["wall_seconds"]) == (512.0, 512.0, 1.5)
    r = evaluate_agents([str(run)], episodes=1, threshold=55.0)["runs"][0]
    assert (r["steps_to_threshold"], r["eval_steps_to_threshold"]) == (768.0, None)
    # no threshold given: the run's own eval.target_return, unset in these runs
    r = evaluate_agents([str(run)], episodes=1)["runs"][0]
    assert r["threshold"] is None and r["steps_to_threshold"] is None


def test_folders_without_an_agent_or_a_run_are_clear_errors_naming_them(gym_runs: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    from rlhfkit.evaluate.agents import evaluate_agents

    unfinished = tmp_path / "unfinished"
    shutil.copytree(gym_runs["seed1"], unfinished)
    shutil.rmtree(unfinished / "agent")
    with pytest.raises(RlhfkitError, match=f"{unfinished}: no agent/agent.json"):
        evaluate_agents([str(gym_runs["seed1"]), str(unfinished)], episodes=1)
    with pytest.raises(RlhfkitError, match=f"{tmp_path / 'empty'}: no such folder"):
        evaluate_agents([str(tmp_path / "empty")], episodes=1)
    with pytest.raises(RlhfkitError, match="given twice"):
        evaluate_agents([str(gym_runs["seed1"]), str(gym_runs["seed1"]) + "/"], episodes=1)


def test_rlhf_runs_get_a_label_efficiency_series_and_the_report_shows_it(gym_runs: dict[str, Path]) -> None:
    from rlhfkit.evaluate.agents import agents_report, evaluate_agents

    result = evaluate_agents([str(gym_runs["seed1"]), str(gym_runs["seed2"]), str(gym_runs["rlhf"])], episodes=2,
                             threshold=15.0)
    rlhf = result["runs"][2]
    assert rlhf["algo"] == "rlhf" and rlhf["labels"] == 20.0 and rlhf["label_curve_of"] == "eval/return"
    labels = [n for n, _ in rlhf["label_curve"]]
    # evaluations every 256 steps (4 of them); the labels so far never decrease and end at the budget
    assert len(labels) == 4 and labels == sorted(labels) and labels[-1] == 20.0
    assert [y for _, y in rlhf["label_curve"]] == [y for _, y in rlhf["eval_curve"]]
    report = Report("agents")
    agents_report(result, report)
    page = report.html()
    assert "CartPole-v1 ppo" in page and "CartPole-v1 rlhf" in page and "label efficiency" in page
    assert page.count("data:image/png;base64,") == 4  # final returns, training and eval bands, labels
    assert "reached (train)" in page
