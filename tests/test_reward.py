"""Reward models end to end on tiny:llama: pooling, learning (pairwise, regression, classification),
LoRA merge, determinism, exact resume, bad data, and scoring files."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from rlhfkit.config import load_config
from rlhfkit.data.formats import RowProblem, Sample, validate_rows
from rlhfkit.data.sources import Row
from rlhfkit.data.tokenize import tokenize_sft
from rlhfkit.errors import ConfigError, DataError, ModelError
from rlhfkit.models.heads import (
    build_reward_model,
    encode_response,
    freeze_backbone,
    head_outputs,
    last_token_index,
    pad_right,
    score_sequences,
)
from rlhfkit.models.load import LoraConfig, ModelConfig, apply_lora
from rlhfkit.recipes.reward import RewardConfig, load_reward_model, score_file, score_texts, train
from tests.conftest import write_jsonl

TINY = [
    "model.name=tiny:llama",
    "train.lr=3e-3",
    "train.batch_size=8",
    "train.scheduler=linear",
    "data.max_length=96",
    "progress=false",
    "tensorboard=false",
]
GOOD = ["great", "helpful", "clear", "kind", "correct", "useful"]
BAD = ["awful", "rude", "wrong", "useless", "boring", "confusing"]
TOPICS = ["the sea", "bread", "trains", "music", "winter", "cats", "maths", "gardens", "rain", "coffee", "books"]
FRAMES = ["This answer is {w}.", "I find it {w}.", "Honestly, {w}.", "It was {w} to read."]
RATED = {"awful": 1.0, "poor": 2.0, "fine": 3.0, "good": 4.0, "superb": 5.0}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """tiny:llama tensors are too small for intra-op threads to help; on a busy machine oversubscribed
    threads made this file several times slower. Restored afterwards for the other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def preference_rows(n: int, seed: int) -> list[dict]:
    """Separable pairs: the chosen answer holds a 'good' word, the rejected one a 'bad' word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        frame = rng.choice(FRAMES)
        rows.append({"prompt": f"Tell me about {rng.choice(TOPICS)}.", "chosen": frame.format(w=rng.choice(GOOD)),
                     "rejected": frame.format(w=rng.choice(BAD))})
    return rows


def rating_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = rng.choice(list(RATED))
        rows.append({"prompt": f"Tell me about {rng.choice(TOPICS)}.", "response": rng.choice(FRAMES).format(w=word),
                     "score": RATED[word] + rng.uniform(-0.3, 0.3)})
    return rows


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _series(run_dir: Path, key: str) -> dict[int, float]:
    return {row["step"]: row[key] for row in _metrics(run_dir) if key in row}


def _pearson(a: list[float], b: list[float]) -> float:
    return torch.corrcoef(torch.tensor([a, b], dtype=torch.float64))[0, 1].item()


# --------------------------------------------------------------------------------------------------
# Pooling and inputs


def test_last_token_index():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 0, 4]  # right padding, none, one token, left padding


def _pooling_rows(pad: int) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """Token rows for the pooling tests (the last one ends with the pad id as a real token), right-padded."""
    seqs = [[1, 520, 9531, 198, 31041], [1, 4093, 198], [1, 520, 31041, 198, 6004, 9531, pad]]
    return (seqs, *pad_right(seqs, pad))


def _padding_never_counts(model, ids, mask, got):
    noisy = ids.clone()
    noisy[mask == 0] = torch.randint(3, 1000, (int((mask == 0).sum()),))
    assert torch.allclose(score_sequences(model, noisy, mask), got, atol=1e-6)


def test_score_is_read_at_the_last_real_token_and_padding_never_matters(tokenizer):
    model = build_reward_model(ModelConfig(name="tiny:llama", device="cpu"), tokenizer, seed=1).eval()
    pad = tokenizer.pad_token_id
    # The last row ends with the pad/eos id itself (2 in SmolLM2): transformers' own pooling, which looks
    # for the last token != pad_token_id, would score it one token early.
    seqs, ids, mask = _pooling_rows(pad)
    with torch.no_grad():
        got = score_sequences(model, ids, mask)  # (B,)
        naive = torch.stack([model.score(model.model(torch.tensor([s])).last_hidden_state[0, -1])[0] for s in seqs])
        assert got.shape == (3,)
        assert torch.allclose(got, naive, atol=1e-5), (got, naive)
        _padding_never_counts(model, ids, mask, got)
        hf = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        assert not torch.allclose(hf[2], naive[2], atol=1e-4)  # why we pool from the attention mask


def test_mean_pooling_against_a_naive_loop(tokenizer):
    model = build_reward_model(ModelConfig(name="tiny:llama", device="cpu"), tokenizer, seed=1).eval()
    model.config.rlhfkit_pooling = "mean"
    pad = tokenizer.pad_token_id
    seqs, ids, mask = _pooling_rows(pad)
    with torch.no_grad():
        got = score_sequences(model, ids, mask)
        # Each row alone, unpadded: the head at every position, averaged.
        naive = [model.score(model.model(torch.tensor([s])).last_hidden_state[0]).mean().item() for s in seqs]
        assert got.tolist() == pytest.approx(naive, abs=1e-5)
        _padding_never_counts(model, ids, mask, got)


def test_mean_pooling_sums_bf16_scores_in_float32(tokenizer):
    # Under bf16 autocast the head's per-token scores are bf16; their mean is taken in float32, so two
    # answers whose means differ by less than bf16's resolution (~0.4% of the score) still differ.
    model = build_reward_model(ModelConfig(name="tiny:llama", device="cpu"), tokenizer, seed=1).eval()
    model.config.rlhfkit_pooling = "mean"
    _, ids, mask = _pooling_rows(tokenizer.pad_token_id)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = score_sequences(model, ids, mask)
        per_token = head_outputs(model, ids, mask)
    assert per_token.dtype == torch.bfloat16 and got.dtype == torch.float32
    m = mask.float()
    assert torch.allclose(got, (per_token.float()[..., 0] * m).sum(1) / m.sum(1), atol=1e-6)


def test_inputs_are_rendered_like_the_policy_sees_them(tokenizer):
    ids = encode_response(tokenizer, "Hi there", "Hello!", max_length=512)
    assert ids == tokenize_sft(Sample("x", prompt="Hi there", completion="Hello!"), tokenizer, max_length=512).input_ids
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\nHello!<|im_end|>\n")
    user, assistant = {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}
    assert encode_response(tokenizer, [user], "Hello!", max_length=512) == ids
    assert encode_response(tokenizer, [user], [assistant], max_length=512) == ids
    with pytest.raises(RowProblem, match="prompt is longer than data.max_length"):
        encode_response(tokenizer, "word " * 50, "Hello!", max_length=20, truncation="right")
    cut = encode_response(tokenizer, "Hi there", "word " * 50, max_length=40, truncation="right")
    assert cut == tokenize_sft(Sample("x", prompt="Hi there", completion="word " * 50), tokenizer,
                               max_length=10_000).input_ids[:40]


def test_config_rejects_impossible_combinations():
    with pytest.raises(ConfigError, match="freeze_backbone"):
        load_config(RewardConfig, None, ["freeze_backbone=true", "lora.enabled=true"])
    with pytest.raises(ConfigError, match="num_labels"):
        load_config(RewardConfig, None, ["mode=pairwise", "num_labels=3"])
    with pytest.raises(ConfigError, match="lora.target_modules"):
        load_config(RewardConfig, None, ["lora.enabled=true", "lora.target_modules=q_proj,score"])


# --------------------------------------------------------------------------------------------------
# Pairwise: learning, saved statistics, scoring


@pytest.fixture(scope="module")
def pairwise_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("pairwise")
    train_file = write_jsonl(root / "train.jsonl", preference_rows(64, seed=0))
    eval_file = write_jsonl(root / "eval.jsonl", preference_rows(32, seed=1))
    cfg = load_config(RewardConfig, None, [*TINY, "train.max_steps=12", f"data.train={train_file}",
                                           f"data.eval={eval_file}", f"output_dir={root / 'run'}"])
    out = train(cfg)
    return out, train_file, eval_file


def test_pairwise_learns_a_separable_preference(pairwise_run):
    out, _, _ = pairwise_run
    run = out.parent
    acc = _series(run, "eval/accuracy")
    assert set(acc) == {0, 12}
    assert acc[12] >= 0.9, acc
    loss = _series(run, "train/loss")
    assert sorted(loss) == list(range(1, 13)) and loss[12] < loss[1]
    last = _metrics(run)[-3]  # the step-12 train row
    for key in ("train/accuracy", "train/margin", "train/reward_mean", "train/reward_std", "train/lr", "train/grad_norm"):
        assert key in last, key
    evals = [r for r in _metrics(run) if "eval/loss" in r][-1]
    assert {"eval/accuracy", "eval/margin", "eval/reward_mean", "eval/reward_std"} <= set(evals)
    assert evals["eval/margin"] > 0


def test_saved_model_is_plain_hf_and_carries_reward_stats(pairwise_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, train_file, _ = pairwise_run
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).chat_template
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    stats = json.loads((out / "reward_stats.json").read_text())
    assert stats["rlhfkit_mode"] == "pairwise"
    assert model.config.rlhfkit_reward_mean == stats["rlhfkit_reward_mean"]
    assert model.config.rlhfkit_reward_std == stats["rlhfkit_reward_std"] > 0
    # The stats are the mean/std of the scores of every training response (chosen and rejected).
    rows = [json.loads(x) for x in train_file.read_text().splitlines()]
    rm, tok = load_reward_model(str(out), device="cpu")
    scores = score_texts(rm, tok, [r["prompt"] for r in rows] * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
    t = torch.tensor(scores, dtype=torch.float64)
    assert t.mean().item() == pytest.approx(stats["rlhfkit_reward_mean"], abs=1e-4)
    assert t.std(unbiased=False).item() == pytest.approx(stats["rlhfkit_reward_std"], abs=1e-4)
    z = score_texts(rm, tok, [rows[0]["prompt"]], [rows[0]["chosen"]], normalize=True)
    assert z[0] == pytest.approx((scores[0] - stats["rlhfkit_reward_mean"]) / stats["rlhfkit_reward_std"], abs=1e-5)


def test_score_file_preference_and_response_rows(pairwise_run, tmp_path):
    out, _, eval_file = pairwise_run
    scored = score_file(str(out), str(eval_file), str(tmp_path / "pairs.jsonl"))
    rows = [json.loads(x) for x in scored.read_text().splitlines()]
    assert len(rows) == 32 and {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"} <= set(rows[0])
    assert sum(r["score_chosen"] > r["score_rejected"] for r in rows) / len(rows) >= 0.9
    evals = [r for r in _metrics(out.parent) if "eval/accuracy" in r][-1]
    assert sum(r["score_chosen"] > r["score_rejected"] for r in rows) / len(rows) == evals["eval/accuracy"]

    singles = write_jsonl(tmp_path / "responses.jsonl", [
        {"prompt": "Tell me about rain.", "response": "This answer is great.", "id": 7},
        {"prompt": [{"role": "user", "content": "Tell me about rain."}], "response": "This answer is awful."},
    ])
    scored = score_file(str(out), str(singles), str(tmp_path / "sub" / "singles.jsonl"))
    rows = [json.loads(x) for x in scored.read_text().splitlines()]
    assert rows[0]["id"] == 7 and rows[0]["score"] > rows[1]["score"]

    with pytest.raises(ModelError, match="not a reward model"):
        score_file("tiny:llama", str(singles), str(tmp_path / "never.jsonl"))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "response": "y"}, {"prompt": "x"}])
    with pytest.raises(DataError, match=f"{bad}:2: field 'response' is missing"):
        score_file(str(out), str(bad), str(tmp_path / "never.jsonl"))
    assert not (tmp_path / "never.jsonl").exists()


# --------------------------------------------------------------------------------------------------
# Regression and classification


def test_regression_learns_ratings_and_scores_in_original_units(tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", rating_rows(64, seed=0))
    eval_file = write_jsonl(tmp_path / "eval.jsonl", rating_rows(32, seed=1))
    out = train(load_config(RewardConfig, None, [*TINY, "mode=regression", "train.max_steps=32",
                                                 f"data.train={train_file}", f"data.eval={eval_file}",
                                                 f"output_dir={tmp_path / 'run'}"]))
    pearson, mse = _series(out.parent, "eval/pearson"), _series(out.parent, "eval/mse")
    assert pearson[0] == 0.0  # head_init=auto -> zeros for regression: every prediction starts at the mean
    assert pearson[32] > 0.7, pearson
    assert mse[32] < 0.5 * mse[0], mse  # explains over half of the variance, not just the ranking
    targets = [r["score"] for r in rating_rows(64, seed=0)]
    config = json.loads((out / "config.json").read_text())
    assert config["rlhfkit_target_mean"] == pytest.approx(sum(targets) / 64)
    scored = [json.loads(x) for x in score_file(str(out), str(eval_file), str(tmp_path / "s.jsonl")).read_text().splitlines()]
    preds, refs = [r["score"] for r in scored], [r["reference_score"] for r in scored]
    assert _pearson(preds, refs) > 0.7
    assert abs(sum(preds) / len(preds) - sum(refs) / len(refs)) < 1.0  # de-normalized: on the 1..5 scale


def test_classification_with_frozen_backbone_trains_only_the_head(tmp_path, tokenizer, capsys):
    from transformers import AutoModelForSequenceClassification

    from rlhfkit.models.tiny import build_tiny

    words = [["red", "blue", "green"], ["dog", "cat", "horse"], ["one", "two", "three"]]
    rng = random.Random(0)
    rows = [{"text": f"I think of {rng.choice(words[k])} when I hear about {rng.choice(TOPICS)}.", "label": k}
            for k in (rng.randrange(3) for _ in range(96))]
    data = write_jsonl(tmp_path / "cls.jsonl", rows)
    out = train(load_config(RewardConfig, None, [*TINY, "mode=classification", "freeze_backbone=true", "train.lr=3e-2",
                                                 "train.max_steps=12", f"data.train={data}", "data.eval_fraction=0.25",
                                                 f"output_dir={tmp_path / 'run'}"]))
    assert "192 trainable" in capsys.readouterr().out  # the head alone: 3 classes x hidden 64
    loss = _series(out.parent, "eval/loss")
    assert loss[12] < loss[0]
    assert set(_series(out.parent, "eval/accuracy")) == {0, 12}
    saved = AutoModelForSequenceClassification.from_pretrained(out)
    assert saved.config.num_labels == 3
    start = build_tiny("llama", tokenizer).model.state_dict()
    for name, value in saved.model.state_dict().items():
        assert torch.equal(value, start[name]), f"backbone weight {name} changed"
    fresh = build_reward_model(ModelConfig(name="tiny:llama", device="cpu"), tokenizer, num_labels=3, seed=42)
    assert not torch.equal(saved.score.weight, fresh.score.weight)  # the head did train
    freeze_backbone(fresh)
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == ["score.weight"]


# --------------------------------------------------------------------------------------------------
# LoRA, determinism, resume


def test_lora_trains_the_head_and_the_merged_folder_scores_the_same(tmp_path, tokenizer):
    from safetensors.torch import load_file

    from rlhfkit.runtime.checkpoint import load_model_weights

    data = write_jsonl(tmp_path / "train.jsonl", preference_rows(32, seed=0))
    args = [*TINY, "lora.enabled=true", "lora.r=4", "train.lr=1e-2", "train.max_steps=3", "data.eval_fraction=0",
            "model.gradient_checkpointing=true",
            f"data.train={data}", f"output_dir={tmp_path / 'run'}"]
    out = train(load_config(RewardConfig, None, args))
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000003" / "model"
    assert "base_model.model.score.weight" in load_file(str(ckpt / "adapter_model.safetensors"))
    assert not (out / "adapter_config.json").exists()

    # The in-memory model: base + LoRA (+ trained head copy) restored from the final checkpoint.
    peft_model = apply_lora(build_reward_model(ModelConfig(name="tiny:llama", device="cpu"), tokenizer, seed=42),
                            LoraConfig(enabled=True, r=4), task_type="SEQ_CLS")
    assert peft_model.base_model.model.score.modules_to_save["default"].weight.requires_grad
    load_model_weights(peft_model, ckpt)
    peft_model.eval()
    rows = preference_rows(8, seed=5)
    prompts, responses = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    in_memory = score_texts(peft_model, tokenizer, prompts, responses)
    merged, tok = load_reward_model(str(out), device="cpu")
    reloaded = score_texts(merged, tok, prompts, responses)
    assert torch.allclose(torch.tensor(in_memory), torch.tensor(reloaded), atol=1e-5), (in_memory, reloaded)
    untrained = score_texts(build_reward_model(ModelConfig(name="tiny:llama", device="cpu"), tokenizer, seed=42).eval(),
                            tokenizer, prompts, responses)
    assert not torch.allclose(torch.tensor(untrained), torch.tensor(reloaded), atol=1e-3)


def test_same_seed_is_bit_identical_and_resume_continues_exactly(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", preference_rows(40, seed=0))
    common = [*TINY, "train.batch_size=4", "train.grad_accum=2", "train.max_steps=4", "train.save_every=2",
              "train.save_total_limit=0", "data.eval_fraction=0.2", f"data.train={data}"]
    a, b = tmp_path / "a", tmp_path / "b"
    train(load_config(RewardConfig, None, [*common, f"output_dir={a}"]))
    train(load_config(RewardConfig, None, [*common, f"output_dir={b}"]))

    def strip(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in ("train/tokens_per_s", "train/step_seconds")} for r in rows]

    assert strip(_metrics(a)) == strip(_metrics(b)), "two runs with the same seed must log identical metrics"
    assert (a / "model" / "model.safetensors").read_bytes() == (b / "model" / "model.safetensors").read_bytes()

    # Interrupt `b` right after its step-2 checkpoint and resume in a fresh call.
    shutil.rmtree(b / "checkpoints" / "step-00000004")
    (b / "checkpoints" / "latest").write_text("step-00000002\n")
    train(load_config(RewardConfig, None, [*common, f"output_dir={b}"]), resume="latest")
    assert strip(_metrics(a)) == strip(_metrics(b)), "the resumed run must log exactly what the straight run did"
    assert (a / "model" / "model.safetensors").read_bytes() == (b / "model" / "model.safetensors").read_bytes()
    assert json.loads((a / "model" / "reward_stats.json").read_text()) == json.loads(
        (b / "model" / "reward_stats.json").read_text())


# --------------------------------------------------------------------------------------------------
# Bad data


def test_bad_preference_rows_are_listed_and_nothing_is_written(tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."},
        {"prompt": "Hi", "chosen": "Hello."},
        '{"prompt": "x", "chosen": ',
        {"prompt": "Hi", "chosen": "Same.", "rejected": "Same."},
        {"prompt": "Hi", "chosen": "Hello.", "rejected": "Bye.", "margin": "lots"},
        {"prompt": "Hi", "chosen": "word " * 200, "rejected": "Bye."},
    ])
    run = tmp_path / "run"
    with pytest.raises(DataError) as info:
        train(load_config(RewardConfig, None, [*TINY, f"data.train={data}", f"output_dir={run}"]))
    msg = str(info.value)
    assert info.value.exit_code == 2
    assert f"{data}:2: field 'rejected' is missing" in msg
    assert f"{data}:3: not valid JSON" in msg
    assert f"{data}:4: field 'chosen' is identical to 'rejected'" in msg
    assert f"{data}:5: field 'margin' has the wrong type: expected a number, got 'lots'" in msg
    assert f"{data}:6: prompt + chosen is longer than data.max_length after tokenization" in msg
    assert not run.exists(), "nothing may be written before the data is valid"


def test_classification_rows_validate_labels():
    rows = [Row(f"f.jsonl:{i}", data={"text": "hi", "label": v}) for i, v in enumerate([2, 2.0, "2", " 0 "], start=1)]
    samples, problems = validate_rows(rows, "classification")
    assert problems == [] and [s.label for s in samples] == [2, 2, 2, 0] and samples[0].text == "hi"
    bad = [{"text": "hi", "label": True}, {"text": "hi", "label": 1.5}, {"text": "hi"}, {"label": 1}, {"text": "hi", "label": [1]}]
    _, problems = validate_rows([Row(f"f.jsonl:{i}", data=d) for i, d in enumerate(bad, start=1)], "classification")
    assert problems == [
        "f.jsonl:1: field 'label' has the wrong type: expected an integer >= 0, got a boolean",
        "f.jsonl:2: field 'label' has the wrong type: expected an integer >= 0, got 1.5",
        "f.jsonl:3: field 'label' is missing",
        "f.jsonl:4: field 'text' is missing",
        "f.jsonl:5: field 'label' has the wrong type: expected an integer >= 0, got a list",
    ]


def test_bad_classification_labels(tmp_path):
    csv = tmp_path / "cls.csv"
    csv.write_text("text,label\nfine,1\nalso fine,0\nnegative,-1\nword,x\nbig,7\n")
    run = tmp_path / "run"
    with pytest.raises(DataError) as info:
        train(load_config(RewardConfig, None, [*TINY, "mode=classification", "num_labels=2", f"data.train={csv}",
                                               f"output_dir={run}"]))
    msg = str(info.value)
    assert f"{csv}:4: field 'label' must be an integer >= 0, got -1" in msg
    assert f"{csv}:5: field 'label' has the wrong type: expected an integer >= 0, got 'x'" in msg
    assert not run.exists()
    csv.write_text("text,label\nfine,1\nalso fine,0\nbig,7\n")
    with pytest.raises(DataError, match=f"{csv}:4: field 'label' is 7, but num_labels is 2"):
        train(load_config(RewardConfig, None, [*TINY, "mode=classification", "num_labels=2", f"data.train={csv}",
                                               f"output_dir={run}"]))
