"""rlhfkit eval for language models: the numbers on hand-made answers and scores, a length-hacking policy
caught by the length checks, KL on a hand-built case, the command on tiny models, and the report in a real
browser (plots shown, hostile answers escaped)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from rlhfkit.evaluate.lm import Answers, LMEvalConfig, compare, token_kl
from rlhfkit.rollout.generate import Completion


def comp(n_tokens: int, text: str = "x", ended: bool = True) -> Completion:
    return Completion(list(range(n_tokens)), ended, text)


def answers(lengths: list[int], sampled: list[list[int]] | None = None) -> Answers:
    return Answers([comp(n) for n in lengths], [[comp(n) for n in group] for group in (sampled or [[] for _ in lengths])])


def test_compare_gives_the_win_rate_and_means_of_hand_made_scores():
    # 4 prompts, greedy only. tuned beats base on prompts 0 and 1, ties on 2, loses on 3:
    # wins 2, ties 1, losses 1 -> win rate (2 + 0.5) / 4 = 0.625; without ties 2 / 3.
    cfg = LMEvalConfig(samples=0)
    prompts = ["p0", "p1", "p2", "p3"]
    ans = {"base": answers([5, 5, 5, 5]), "tuned": answers([5, 5, 5, 5])}
    scored = {"base": {"greedy": {"s": [0.0, 0.1, 0.5, 0.9]}}, "tuned": {"greedy": {"s": [0.4, 0.2, 0.5, 0.1]}}}
    out = compare(prompts, ans, "base", scored, cfg)
    w = out["win_rate"]["s"]["tuned"]["greedy"]
    assert (w["wins"], w["ties"], w["losses"], w["n"]) == (2, 1, 1, 4)
    assert w["win_rate"] == pytest.approx(0.625)
    assert w["win_rate_no_ties"] == pytest.approx(2 / 3)
    assert w["lo"] <= 0.625 <= w["hi"]
    # means: base (0 + .1 + .5 + .9) / 4 = 0.375, tuned (.4 + .2 + .5 + .1) / 4 = 0.3
    assert out["scores"]["s"]["base"]["greedy"]["mean"] == pytest.approx(0.375)
    assert out["scores"]["s"]["tuned"]["greedy"]["mean"] == pytest.approx(0.3)
    assert "sampled" not in out["scores"]["s"]["base"]


def test_sampled_answers_are_averaged_per_prompt_before_pairing():
    # k = 2 samples per prompt. prompt 0: tuned mean (1 + 0) / 2 = 0.5 vs base (0 + 0) / 2 = 0 -> win;
    # prompt 1: tuned (0 + 0) / 2 = 0 vs base (1 + 1) / 2 = 1 -> loss. One win, one loss: 0.5 over 2 pairs.
    cfg = LMEvalConfig(samples=2)
    ans = {"base": answers([3, 3], [[3, 3], [3, 3]]), "tuned": answers([3, 3], [[3, 3], [3, 3]])}
    scored = {"base": {"greedy": {"s": [0, 0]}, "sampled": {"s": [0, 0, 1, 1]}},
              "tuned": {"greedy": {"s": [0, 0]}, "sampled": {"s": [1, 0, 0, 0]}}}
    w = compare(["a", "b"], ans, "base", scored, cfg)["win_rate"]["s"]["tuned"]["sampled"]
    assert (w["wins"], w["losses"], w["n"]) == (1, 1, 2)


def test_a_length_hacking_policy_is_caught_by_the_length_checks():
    # The tuned policy "wins" only by writing longer: every score is the answer's length. Base answers
    # are 10 tokens; tuned answers are 20 tokens on 16 prompts, and 10 tokens (same score as base) on 4.
    cfg = LMEvalConfig(samples=0, length_tolerance=0.2)
    n = 20
    base_len = [10] * n
    tuned_len = [20] * 16 + [10] * 4
    ans = {"base": answers(base_len), "tuned": answers(tuned_len)}
    scored = {"base": {"greedy": {"len": [float(x) for x in base_len]}},
              "tuned": {"greedy": {"len": [float(x) for x in tuned_len]}}}
    out = compare([f"p{i}" for i in range(n)], ans, "base", scored, cfg)
    w = out["win_rate"]["len"]["tuned"]["greedy"]
    assert w["win_rate"] == pytest.approx((16 + 0.5 * 4) / 20)  # 0.9: looks like a clear win
    lb = out["length_bias"]["len"]["tuned"]["greedy"]
    assert lb["score_vs_length"]["pearson"] == pytest.approx(1.0)  # the score is length
    # on the 4 length-matched prompts the two answers tie: the win is gone (0.5)
    assert lb["length_matched"]["matched"] == 4
    assert lb["length_matched"]["win_rate"] == pytest.approx(0.5)


class _Fixed(torch.nn.Module):
    """A 'model' whose next-token distribution is the same at every position: softmax(logits)."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(logits))

    def forward(self, input_ids, attention_mask=None):  # noqa: ANN001
        B, T = input_ids.shape

        class Out:
            pass

        out = Out()
        out.logits = self.w.expand(B, T, -1).clone()
        return out


def test_token_kl_matches_the_log_ratio_of_known_distributions():
    # policy p = softmax([log .5, log .25, log .25]) = (.5, .25, .25), reference uniform (1/3 each).
    # An answer of tokens [0, 1] that ended (EOS id 2 appended): k1 = log(.5/(1/3)) + log(.25/(1/3))
    # + log(.25/(1/3)) over its 3 tokens.
    import math

    p = _Fixed([math.log(0.5), math.log(0.25), math.log(0.25)])
    q = _Fixed([0.0, 0.0, 0.0])
    out = token_kl(p, q, [[1, 1]], [Completion([0, 1], True, "")], eos_id=2, pad_id=0)
    expected = math.log(1.5) + 2 * math.log(0.75)
    assert out[0]["n"] == 3
    assert out[0]["k1"] == pytest.approx(expected, abs=1e-5)
    # k3 = sum over tokens of (r - 1 - log r), r = ref / pi: (2/3 - 1 - log 2/3) + 2 (4/3 - 1 - log 4/3)
    k3 = (2 / 3 - 1 - math.log(2 / 3)) + 2 * (4 / 3 - 1 - math.log(4 / 3))
    assert out[0]["k3"] == pytest.approx(k3, abs=1e-5)


HOSTILE = "<script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\">"


def test_answers_are_generated_under_the_chosen_autocast():
    from rlhfkit.evaluate.lm import answer, prompt_token_ids
    from rlhfkit.models.load import ModelConfig, load_causal_lm, load_tokenizer

    tok = load_tokenizer("tiny:llama")
    model = load_causal_lm(ModelConfig(name="tiny:llama", device="cpu"), tokenizer=tok)
    ids = prompt_token_ids(tok, ["Review a cafe.", "Describe a lamp."])
    seen: list[torch.dtype] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    try:
        for mode, dtype in [("no", torch.float32), ("bf16", torch.bfloat16)]:
            seen.clear()
            got = answer(model, tok, ids, LMEvalConfig(samples=1, max_new_tokens=3, mixed_precision=mode))
            assert len(got.greedy) == 2 and [len(g) for g in got.sampled] == [1, 1]
            assert seen and set(seen) == {dtype}, (mode, set(seen))
    finally:
        handle.remove()


def test_eval_command_writes_report_summary_and_answers(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ["Review a cafe.", HOSTILE, "Describe a lamp."]))
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "rlhfkit", "eval", "--model", "same=tiny:llama", "--base", "tiny:llama",
                           "--prompts", str(prompts), "--scorers", "length,sentiment", "--max-new-tokens", "6",
                           "--samples", "1", "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "win rate" in done.stdout and "report:" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    # the same weights on both sides: identical answers, every prompt a tie, zero KL
    w = summary["win_rate"]["length"]["same"]["greedy"]
    assert (w["ties"], w["win_rate"]) == (3, 0.5)
    assert summary["kl"]["same"]["k1_per_token"] == pytest.approx(0.0, abs=1e-6)
    rows = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows][1] == HOSTILE
    html = (out / "report.html").read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_eval_refuses_bad_inputs_before_loading_models(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "rlhfkit", "eval", *args, "-o", str(tmp_path / "r")],
                              capture_output=True, text=True, timeout=120)

    bad = run("--model", str(tmp_path / "missing"), "--base", "tiny:llama")
    assert bad.returncode == 2 and "missing" in bad.stderr
    (tmp_path / "runs").mkdir()
    rel = subprocess.run([sys.executable, "-m", "rlhfkit", "eval", "--model", "runs/nope", "--base", "tiny:llama",
                          "-o", "r"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert rel.returncode == 2 and "model folder 'runs/nope' not found" in rel.stderr  # not taken for a hub id
    bad = run("--model", "tiny:llama", "--base", "tiny:llama", "--scorers", "no_such_scorer")
    assert bad.returncode == 2 and "no_such_scorer" in bad.stderr
    bad = run("--model", "tiny:llama")
    assert bad.returncode == 2 and "--base" in bad.stderr
    bad = run("--model", "tiny:llama", "--base", "tiny:llama", "--runs", str(tmp_path / "nope"))
    assert bad.returncode == 2 and "nope" in bad.stderr
    bad = run("--model", "tiny:llama", "--base", "tiny:llama", "--mixed-precision", "fp8")
    assert bad.returncode == 2 and "mixed_precision" in bad.stderr
    assert not (tmp_path / "r").exists()


def test_report_opens_in_a_browser_with_its_plots_and_escaped_answers(tmp_path, page):
    from rlhfkit.evaluate.lm_report import write_outputs

    cfg = LMEvalConfig(samples=0)
    ans = {"base": Answers([comp(4, "plain answer")], []), "tuned": Answers([comp(6, HOSTILE)], [])}
    scored = {"base": {"greedy": {"s": [0.1]}}, "tuned": {"greedy": {"s": [0.7]}}}
    summary = compare([HOSTILE], ans, "base", scored, cfg)
    summary.update(kind="lm", base="B", models={"tuned": "T"}, scorers=["s"], kl={}, prompts={"source": "x", "n": 1},
                   settings={**cfg.__dict__}, texts=[{"prompt": HOSTILE, "base/greedy": "plain answer",
                                                     "tuned/greedy": HOSTILE, "base/greedy_scores": {"s": 0.1},
                                                     "tuned/greedy_scores": {"s": 0.7}}])
    path = write_outputs(summary, tmp_path / "r")
    page.goto(path.as_uri())
    assert page.evaluate("window.__pwned") is None  # nothing from the answers ran
    assert HOSTILE in page.inner_text("body")  # and the text is shown as text
    sizes = page.evaluate("[...document.images].map(i => [i.complete, i.naturalWidth])")
    assert sizes and all(ok and width > 0 for ok, width in sizes)  # every plot decoded
    assert page.console_errors == []
