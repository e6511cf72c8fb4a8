import math

import pytest
import torch
import torch.nn.functional as F

from losses.contrastive_flow import contrastive_velocity_loss, contrastive_weight, info_nce_from_cosines
from utils.distributed import gather_no_grad


def _loss(target, v, x_0, x_1, t=None, valid=None, tau=0.07):
    b = v.shape[0]
    t = torch.full((b,), 0.5) if t is None else t
    x_t = t.view(-1, 1, 1, 1) * x_1 + (1 - t.view(-1, 1, 1, 1)) * x_0
    return contrastive_velocity_loss(target, v, x_0, x_t, t, x_0, x_1, torch.arange(b), tau, valid)


@pytest.mark.parametrize("target", ["velocity", "same_noise", "denoised"])
def test_identical_query_positive_and_negatives_give_log_of_keys(target):
    m = 5  # one positive, four negatives: ln(M + 1) with M = 4 negatives
    x = torch.randn(1, 1, 8, 8)
    x_0 = x.expand(m, -1, -1, -1).clone()
    x_1 = (2 * x).expand(m, -1, -1, -1).clone()
    v = x_1 - x_0
    out = _loss(target, v, x_0, x_1)
    assert out.loss.item() == pytest.approx(math.log(m), abs=1e-5)
    assert out.num_keys == m


def test_matches_an_independent_cross_entropy():
    torch.manual_seed(0)
    v, x_0, x_1 = torch.randn(4, 1, 6, 6), torch.randn(4, 1, 6, 6), torch.randn(4, 1, 6, 6)
    out = _loss("velocity", v, x_0, x_1, tau=0.5)
    q, k = v.flatten(1), (x_1 - x_0).flatten(1)
    cos = torch.stack([torch.stack([F.cosine_similarity(q[i], k[j], dim=0) for j in range(4)]) for i in range(4)])
    expected = -torch.log_softmax(cos / 0.5, dim=1).diagonal().mean()
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)


def test_same_noise_keys_match_explicit_construction():
    torch.manual_seed(1)
    v, x_0, x_1 = torch.randn(3, 1, 5, 5), torch.randn(3, 1, 5, 5), torch.randn(3, 1, 5, 5)
    out = _loss("same_noise", v, x_0, x_1, tau=0.3)
    cos = torch.stack([torch.stack([F.cosine_similarity(v[i].flatten(), (x_1[j] - x_0[i]).flatten(), dim=0)
                                    for j in range(3)]) for i in range(3)])
    expected = -torch.log_softmax(cos / 0.3, dim=1).diagonal().mean()
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)


def test_a_perfect_predictor_shows_the_velocity_shortcut():
    torch.manual_seed(2)
    b = 4
    x_1 = torch.randn(b, 1, 16, 16) * 0.1 + torch.randn(1, 1, 16, 16)  # similar images
    x_0 = torch.randn(b, 1, 16, 16)
    perfect = x_1 - x_0
    shortcut = _loss("velocity", perfect, x_0, x_1)
    assert shortcut.loss.item() < 0.01 * math.log(b)  # the term is ~0: nothing left to teach
    honest = _loss("same_noise", perfect, x_0, x_1)
    assert honest.loss.item() > 10 * shortcut.loss.item()  # negatives share the noise: no shortcut


def test_excluded_negatives_do_not_count():
    torch.manual_seed(3)
    v, x_0, x_1 = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    patient = torch.tensor([0, 0, 1, 1])
    valid = patient[None, :] != patient[:, None]
    out = _loss("velocity", v, x_0, x_1, valid=valid, tau=0.5)
    q, k = F.normalize(v.flatten(1), dim=1), F.normalize((x_1 - x_0).flatten(1), dim=1)
    cos = q @ k.T
    losses = []
    for i in range(4):
        keep = [j for j in range(4) if j == i or patient[j] != patient[i]]
        losses.append(-torch.log_softmax(cos[i, keep] / 0.5, 0)[keep.index(i)])
    torch.testing.assert_close(out.loss, torch.stack(losses).mean(), atol=1e-5, rtol=1e-5)


def test_fp32_even_for_half_inputs_with_large_norms():
    v = (torch.randn(2, 1, 256, 256) * 2).half()
    out = _loss("velocity", v, torch.randn(2, 1, 256, 256).half(), torch.randn(2, 1, 256, 256).half())
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32


def _reference_loss(target, v, x_0, x_t, t, keys_x_0, keys_x_1, positive, tau):
    """The contrastive term written out one anchor and one key at a time (the module docstring's formulas)."""
    losses = []
    for i in range(v.shape[0]):
        q = x_t[i] + (1 - t[i]) * v[i] if target == "denoised" else v[i]
        logits = []
        for j in range(keys_x_1.shape[0]):
            k = {"velocity": keys_x_1[j] - keys_x_0[j], "same_noise": keys_x_1[j] - x_0[i],
                 "denoised": keys_x_1[j]}[target]
            logits.append((q * k).sum() / (q.norm() * k.norm()) / tau)
        logits = torch.stack(logits)
        losses.append(torch.logsumexp(logits, 0) - logits[positive[i]])
    return torch.stack(losses).mean()


def _distinct_keys(seed, b=3, m=7):
    """Local (B = 3) tensors and M = 7 gathered keys, the local samples at positions ``positive``."""
    g = torch.Generator().manual_seed(seed)
    x_0, x_1 = torch.randn(b, 1, 5, 5, generator=g), torch.randn(b, 1, 5, 5, generator=g)
    t = torch.rand(b, generator=g)  # a distinct t per sample
    x_t = t.view(-1, 1, 1, 1) * x_1 + (1 - t.view(-1, 1, 1, 1)) * x_0
    v = torch.randn(b, 1, 5, 5, generator=g)
    positive = torch.tensor([4, 0, 5])  # this rank's samples sit among the other ranks' keys
    keys_x_0, keys_x_1 = torch.randn(m, 1, 5, 5, generator=g), torch.randn(m, 1, 5, 5, generator=g)
    keys_x_0[positive], keys_x_1[positive] = x_0, x_1
    return v, x_0, x_t, t, keys_x_0, keys_x_1, positive


@pytest.mark.parametrize("target", ["velocity", "same_noise", "denoised"])
def test_each_target_matches_its_explicit_construction_with_distinct_keys(target):
    v, x_0, x_t, t, keys_x_0, keys_x_1, positive = _distinct_keys(4)
    out = contrastive_velocity_loss(target, v, x_0, x_t, t, keys_x_0, keys_x_1, positive, 0.2)
    expected = _reference_loss(target, v.double(), x_0.double(), x_t.double(), t.double(), keys_x_0.double(),
                               keys_x_1.double(), positive, 0.2)
    assert out.num_keys == 7
    torch.testing.assert_close(out.loss.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("target", ["velocity", "same_noise", "denoised"])
def test_gradient_reaches_the_prediction_and_never_the_keys(target):
    # As training calls it: the keys come from gather_no_grad, x_0 and x_t are data. Every input is made
    # to require grad here so that a gradient reaching one of them is seen.
    v, x_0, x_t, t, keys_x_0, keys_x_1, positive = (a.clone() for a in _distinct_keys(5))
    leaves = {"v": v, "x_0": x_0, "x_t": x_t, "keys_x_0": keys_x_0, "keys_x_1": keys_x_1}
    for a in leaves.values():
        a.requires_grad_(True)
    gathered_x_0, _ = gather_no_grad(keys_x_0)
    gathered_x_1, _ = gather_no_grad(keys_x_1)
    loss = contrastive_velocity_loss(target, v, x_0, x_t, t, gathered_x_0, gathered_x_1, positive, 0.3).loss
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)))
    assert grads["keys_x_0"] is None and grads["keys_x_1"] is None  # the keys never get a gradient
    # x_0 and x_t are constants of the loss where they appear (same_noise: x_0 in the keys; denoised: x_t in
    # the query): in training they carry no gradient, so v is the only path to the network.
    assert (grads["x_0"] is None) == (target != "same_noise") and (grads["x_t"] is None) == (target != "denoised")
    v_ref = v.detach().double().requires_grad_(True)
    ref = _reference_loss(target, v_ref, x_0.detach().double(), x_t.detach().double(), t.double(),
                          keys_x_0.detach().double(), keys_x_1.detach().double(), positive, 0.3)
    (expected,) = torch.autograd.grad(ref, [v_ref])
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(grads["v"].double(), expected, atol=1e-5, rtol=1e-4)


def test_warmup_is_derived_from_the_epoch():
    assert [contrastive_weight(0.01, 5, e) for e in (0, 4, 5, 100)] == [0.0, 0.0, 0.01, 0.01]


def test_info_nce_reports_cosines():
    cos = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    out = info_nce_from_cosines(cos, torch.tensor([0, 1]), 1.0)
    assert out.pos_cos.item() == pytest.approx(0.85) and out.neg_cos.item() == pytest.approx(0.15)
