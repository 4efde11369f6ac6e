"""rlhfkit.losses.reward: each loss against numbers worked out by hand, and the running-sum metrics
against numpy/torch references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlhfkit.losses.reward import (
    bradley_terry_loss,
    classification_loss,
    mean_std_from_sums,
    pearson_from_sums,
    regression_loss,
)


def nls(x: float) -> float:
    """-log sigmoid(x), written out: log(1 + e^-x)."""
    return math.log1p(math.exp(-x))


def test_bradley_terry_by_hand():
    r_c, r_r = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 2.0])
    loss, m = bradley_terry_loss(r_c, r_r)
    # differences 1, -1, 0: -log sigmoid = 0.313262, 1.313262, 0.693147
    assert loss.item() == pytest.approx((0.3132617 + 1.3132617 + 0.6931472) / 3, abs=1e-6)
    assert loss.item() == pytest.approx((nls(1) + nls(-1) + nls(0)) / 3, abs=1e-6)
    assert m["accuracy"].item() == pytest.approx(1 / 3)  # the tie counts as wrong
    assert m["margin"].item() == pytest.approx(0.0)
    assert m["chosen"].item() == pytest.approx(1.0) and m["rejected"].item() == pytest.approx(1.0)


def test_bradley_terry_margin_by_hand():
    r_c, r_r = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    loss, _ = bradley_terry_loss(r_c, r_r, margin=torch.tensor([0.5, 0.0]))
    # -log sigmoid(1 - 0.5) = 0.474077, -log sigmoid(-1 - 0) = 1.313262
    assert loss.item() == pytest.approx((0.4740770 + 1.3132617) / 2, abs=1e-6)
    # a zero margin is the plain loss
    plain, _ = bradley_terry_loss(r_c, r_r)
    zero, _ = bradley_terry_loss(r_c, r_r, margin=torch.zeros(2))
    assert zero.item() == plain.item()


def test_bradley_terry_centering_term_and_gradient():
    r_c = torch.tensor([1.0, 0.0], requires_grad=True)
    r_r = torch.tensor([0.0, 1.0], requires_grad=True)
    loss, _ = bradley_terry_loss(r_c, r_r, center_coef=0.1)
    # (r_c + r_r)^2 = 1 for both pairs -> + 0.1 * 1
    assert loss.item() == pytest.approx((nls(1) + nls(-1)) / 2 + 0.1, abs=1e-6)
    loss.backward()
    # d/dr_c [-log sigmoid(d)] / B = -(1 - sigmoid(d)) / 2, plus 0.1 * 2 (r_c + r_r) / 2
    sig = torch.sigmoid(torch.tensor([1.0, -1.0]))
    assert torch.allclose(r_c.grad, -(1 - sig) / 2 + 0.1, atol=1e-6)
    assert torch.allclose(r_r.grad, (1 - sig) / 2 + 0.1, atol=1e-6)


def test_regression_by_hand():
    loss, m = regression_loss(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 1.0]))
    assert loss.item() == pytest.approx(5 / 3)  # (0 + 1 + 4) / 3
    assert m["mse"].item() == pytest.approx(5 / 3)


def test_classification_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    loss, m = classification_loss(logits, torch.tensor([1, 0]))
    # softmax rows: (1/2, 1/2) -> -log 1/2; (3/4, 1/4) -> -log 3/4
    assert loss.item() == pytest.approx((math.log(2) - math.log(0.75)) / 2, abs=1e-6)
    assert m["accuracy"].item() == pytest.approx(0.5)  # argmax of a tie is class 0


def test_pearson_and_mean_std_from_sums_match_references():
    gen = np.random.default_rng(0)
    x = gen.normal(size=50)
    y = 0.5 * x + gen.normal(size=50)
    sums = (len(x), x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum())
    assert pearson_from_sums(*sums) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert pearson_from_sums(3, 3.0, 6.0, 3.0, 14.0, 6.0) == 0.0  # x constant: undefined -> 0
    mean, std = mean_std_from_sums(len(x), x.sum(), (x * x).sum())
    assert mean == pytest.approx(x.mean()) and std == pytest.approx(x.std(), abs=1e-12)  # population std
    assert mean_std_from_sums(0, 0.0, 0.0) == (0.0, 0.0)
