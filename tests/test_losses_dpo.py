"""DPO losses against hand-computed values; log-prob gathering against a naive float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.losses.dpo import chosen_nll, dpo_loss
from rlhfkit.losses.logprobs import sequence_logprobs, token_logprobs


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


# One pair worked by hand: policy chosen -10, rejected -12; reference chosen -11, rejected -11.
# chosen ratio = +1, rejected ratio = -1, h = 2.
PC, PR, RC, RR = [torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.0)]


def test_sigmoid_loss_hand_computed() -> None:
    losses, rc, rr = dpo_loss(PC, PR, RC, RR, beta=0.1)
    assert losses.item() == pytest.approx(-_logsig(0.2), abs=1e-6)  # -log sigma(0.1 * 2) = 0.598139
    assert losses.item() == pytest.approx(0.5981389, abs=1e-6)
    assert rc.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)
    assert not rc.requires_grad


def test_conservative_label_smoothing_hand_computed() -> None:
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.1)
    expected = -0.9 * _logsig(0.2) - 0.1 * _logsig(-0.2)  # 0.9*0.598139 + 0.1*0.798139
    assert losses.item() == pytest.approx(expected, abs=1e-6)
    assert losses.item() == pytest.approx(0.6181389, abs=1e-6)


def test_hinge_hand_computed() -> None:
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="hinge")
    assert losses.item() == pytest.approx(1 - 0.2, abs=1e-6)
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=1.0, loss_type="hinge")
    assert losses.item() == 0.0  # margin beyond 1: no loss


def test_ipo_uses_length_normalised_ratios() -> None:
    # chosen: 4 tokens, rejected: 2 tokens -> h_avg = 1/4 - (-1/2) = 0.75; target 1/(2*0.5) = 1
    losses, rc, rr = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="ipo", chosen_lengths=torch.tensor([4]),
                              rejected_lengths=torch.tensor([2]))
    assert losses.item() == pytest.approx((0.75 - 1.0) ** 2, abs=1e-7)
    assert rc.item() == pytest.approx(0.5)  # rewards stay beta * summed log-ratio
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="ipo")
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="kto")


def test_rdpo_length_term_hand_computed() -> None:
    # chosen 30 tokens, rejected 10: the margin gains 0.01 * 20 = 0.2 -> -log sigma(0.2 + 0.2)
    lc, lr = torch.tensor([30]), torch.tensor([10])
    losses, rc, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, chosen_lengths=lc, rejected_lengths=lr, length_alpha=0.01)
    assert losses.item() == pytest.approx(-_logsig(0.4), abs=1e-6)
    assert rc.item() == pytest.approx(0.1)  # the implicit rewards are not shifted
    # a shorter chosen answer gets a smaller margin, so it is pushed harder: length is paid for
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, chosen_lengths=lr, rejected_lengths=lc, length_alpha=0.01)
    assert losses.item() == pytest.approx(-_logsig(0.0), abs=1e-6)
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="hinge", chosen_lengths=lc, rejected_lengths=lr,
                            length_alpha=0.01)
    assert losses.item() == pytest.approx(1 - 0.4, abs=1e-6)
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, length_alpha=0.01)
    with pytest.raises(ValueError, match="IPO"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr, length_alpha=0.01)


def test_rdpo_gradient_is_dpo_with_shifted_margin() -> None:
    # d loss / d pi_c = -beta * sigma(-(beta h + offset)): a longer chosen answer saturates sooner
    pc = torch.tensor([-10.0], requires_grad=True)
    losses, _, _ = dpo_loss(pc, PR, RC, RR, beta=0.1, chosen_lengths=torch.tensor([30]),
                            rejected_lengths=torch.tensor([10]), length_alpha=0.01)
    losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.4)), abs=1e-7)


def test_chosen_nll_is_mean_token_nll() -> None:
    nll = chosen_nll(torch.tensor([-10.0, -3.0]), torch.tensor([4, 0]))
    assert nll.tolist() == pytest.approx([2.5, 3.0])  # an empty count is clamped to 1


def test_batch_is_per_pair_and_gradient_sign() -> None:
    pc = torch.tensor([-10.0, -5.0], requires_grad=True)
    losses, _, _ = dpo_loss(pc, torch.tensor([-12.0, -5.0]), torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0]),
                            beta=0.1)
    assert losses.shape == (2,)
    assert losses[1].item() == pytest.approx(math.log(2), abs=1e-6)  # identical pair: -log sigma(0)
    losses.sum().backward()
    assert (pc.grad < 0).all()  # raising the chosen log-prob lowers the loss


def _naive_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loop over sequences and positions in float64."""
    B, T, _ = logits.shape
    out = torch.zeros(B, dtype=torch.float64)
    for b in range(B):
        for t in range(T - 1):
            y = labels[b, t + 1].item()
            if y == -100:
                continue
            out[b] += torch.log_softmax(logits[b, t].double(), -1)[y]
    return out


@pytest.mark.parametrize("chunk", [1, 3, 128])
def test_sequence_logprobs_match_naive_loop_with_padding(chunk: int) -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[:, :2] = -100  # prompt
    labels[1, 5:] = -100  # right padding
    labels[2, :] = -100  # nothing to score
    total, count = sequence_logprobs(logits, labels, chunk_size=chunk)
    assert torch.allclose(total.double(), _naive_logps(logits, labels), atol=1e-5)
    assert count.tolist() == [5, 3, 0]
    assert total[2].item() == 0.0


def test_token_logprobs_temperature_and_bf16() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 9)
    labels = torch.randint(0, 9, (2, 5))
    hot, _ = token_logprobs(logits, labels, temperature=2.0)
    ref, _ = token_logprobs(logits / 2.0, labels)
    assert torch.allclose(hot, ref, atol=1e-6)
    low, _ = token_logprobs(logits.bfloat16(), labels)
    assert low.dtype == torch.float32  # computed in float32 even from bf16 logits
    assert torch.allclose(low, token_logprobs(logits.bfloat16().float(), labels)[0], atol=1e-6)


def test_logprob_gradients_match_log_softmax() -> None:
    torch.manual_seed(2)
    a = torch.randn(2, 6, 10, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    labels = torch.randint(0, 10, (2, 6))
    labels[0, :3] = -100
    sequence_logprobs(a, labels, chunk_size=2)[0].sum().backward()
    lp = torch.log_softmax(b[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    (lp * (labels[:, 1:] != -100)).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)
