"""The losses through the remote bank against an in-process reference on the same
bank: same loss and same gradient."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import reference_bank
from trainer.bank_feed import BankFeed
from trainer.losses import (
    PartitionEstimate,
    accidental_hits,
    batch_log_z,
    infonce_loss,
    nce_loss,
    sampled_logits,
    softmax_loss,
)

N, D, B, TAU = 300, 16, 8, 0.07


@pytest.fixture
def remote(make_bank):
    bank = make_bank(3, N, D, "float32", seed=7)
    client = bank.client()
    yield client, torch.from_numpy(reference_bank(3, N, D, "float32", seed=7)).double()
    client.close()


def features(seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)


def test_softmax_loss_and_gradient_match_the_full_bank(remote):
    client, bank = remote
    idx = torch.arange(0, 2 * B, 2)
    f = features().requires_grad_()
    positives = torch.from_numpy(client.lookup(idx)).double()
    feed = BankFeed(client, 0, 0.5, torch.device("cpu"))
    loss = softmax_loss(f, positives, TAU, lambda q: tuple(t.double() for t in feed.partition_sums(q, TAU)))
    loss.backward()

    f_ref = features().requires_grad_()
    logits = f_ref @ bank.T / TAU  # (B, N)
    reference = (-logits[torch.arange(B), idx] + torch.logsumexp(logits, dim=1)).mean()
    reference.backward()
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-5)
    torch.testing.assert_close(f.grad, f_ref.grad, rtol=1e-4, atol=1e-6)


def test_nce_loss_and_gradient_match_the_paper_formula(remote):
    client, bank = remote
    idx = torch.arange(B)
    f = features(1).requires_grad_()
    negative_idx, negatives = client.sample(64, seed=3)
    positives = torch.from_numpy(client.lookup(idx)).double()
    pos, neg = sampled_logits(f, positives, torch.from_numpy(negatives).double(), TAU)
    log_z = float(batch_log_z(pos, neg, N))
    loss = nce_loss(pos, neg, log_z, N)
    loss.backward()

    # The paper's form, on rows gathered from the in-process bank.
    f_ref = features(1).requires_grad_()
    z = math.exp(log_z)
    p_pos = torch.exp(f_ref @ bank[idx].T / TAU).diagonal() / z  # (B,)
    p_neg = torch.exp(f_ref @ bank[torch.from_numpy(negative_idx)].T / TAU) / z  # (B, K)
    k_pn = 64 / N
    reference = (-torch.log(p_pos / (p_pos + k_pn)) - torch.log(1 - p_neg / (p_neg + k_pn)).sum(1)).mean()
    reference.backward()
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-6)
    torch.testing.assert_close(f.grad, f_ref.grad, rtol=1e-5, atol=1e-8)


def test_batch_estimate_of_z_is_n_times_mean_exp():
    pos = torch.tensor([1.0, 2.0], dtype=torch.float64)
    neg = torch.tensor([[0.0, 1.0], [3.0, -1.0]], dtype=torch.float64)
    expected = 50 * torch.exp(torch.tensor([1.0, 0.0, 1.0, 2.0, 3.0, -1.0], dtype=torch.float64)).mean()
    assert float(batch_log_z(pos, neg, 50)) == pytest.approx(math.log(expected))


def test_partition_estimate_fixed_and_ema():
    fixed = PartitionEstimate("fixed")
    assert fixed.update(2.0) == 2.0 and fixed.update(5.0) == 2.0
    ema = PartitionEstimate("ema", momentum=0.9)
    ema.update(math.log(10.0))
    assert math.exp(ema.update(math.log(20.0))) == pytest.approx(0.9 * 10 + 0.1 * 20)
    with pytest.raises(ValueError, match="z_mode"):
        PartitionEstimate("sometimes")


def test_infonce_loss_and_gradient_match_the_direct_formula(remote):
    client, bank = remote
    idx = torch.arange(B)
    negative_idx, negatives = client.sample(64, seed=5)
    negative_idx = torch.from_numpy(negative_idx)
    negative_idx[3] = 2  # query 2's own row drawn as a negative: an accidental hit, left out of its sum
    negatives = bank[negative_idx]
    positives = torch.from_numpy(client.lookup(idx)).double()
    f = features(2).requires_grad_()
    loss = infonce_loss(*sampled_logits(f, positives, negatives, TAU), accidental_hits(idx, negative_idx))
    loss.backward()

    # -log( exp(v_i.f/tau) / (exp(v_i.f/tau) + sum over the other negatives of exp(n_k.f/tau)) )
    f_ref = features(2).requires_grad_()
    terms = []
    for b in range(B):
        pos = torch.exp(bank[b] @ f_ref[b] / TAU)
        others = [k for k in range(64) if int(negative_idx[k]) != b]
        terms.append(-torch.log(pos / (pos + torch.exp(negatives[others] @ f_ref[b] / TAU).sum())))
    reference = torch.stack(terms).mean()
    reference.backward()
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-9)
    torch.testing.assert_close(f.grad, f_ref.grad, rtol=1e-7, atol=1e-10)

    # And the gradient against central finite differences of the loss itself.
    def value(x):
        return float(infonce_loss(*sampled_logits(x, positives, negatives, TAU), accidental_hits(idx, negative_idx)))

    direction = features(3)
    eps = 1e-6
    numeric = (value(features(2) + eps * direction) - value(features(2) - eps * direction)) / (2 * eps)
    assert float((f.grad * direction).sum()) == pytest.approx(numeric, rel=1e-5)


def test_infonce_with_every_row_as_negative_is_the_exact_softmax(remote):
    # K -> N: the negatives are the whole bank, each query's own row dropped as an
    # accidental hit, and the loss and gradient are the full softmax's.
    client, bank = remote
    idx = torch.arange(1, 3 * B, 3)
    positives = torch.from_numpy(client.lookup(idx)).double()
    f = features(4).requires_grad_()
    every = torch.arange(N)
    loss = infonce_loss(*sampled_logits(f, positives, bank, TAU), accidental_hits(idx, every))
    loss.backward()
    f_ref = features(4).requires_grad_()
    feed = BankFeed(client, 0, 0.5, torch.device("cpu"))
    exact = softmax_loss(f_ref, positives, TAU, lambda q: tuple(t.double() for t in feed.partition_sums(q, TAU)))
    exact.backward()
    assert float(loss.detach()) == pytest.approx(float(exact.detach()), rel=1e-6)
    torch.testing.assert_close(f.grad, f_ref.grad, rtol=1e-4, atol=1e-6)
