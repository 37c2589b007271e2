"""clip_loss against a naive reference, known values, and its rank-local form."""

import math

import torch
import torch.nn.functional as F

from clip import clip_loss, clip_loss_rows


def naive_clip_loss(image, text, scale):
    """Per-element loops: mean over i of -log softmax_j(s <x_i, y_j>)[i], both directions, averaged."""
    n = len(image)
    i2t = t2i = 0.0
    for i in range(n):
        logits = [scale * float(image[i] @ text[j]) for j in range(n)]
        i2t += -(logits[i] - math.log(sum(math.exp(v) for v in logits)))
        logits = [scale * float(text[i] @ image[j]) for j in range(n)]
        t2i += -(logits[i] - math.log(sum(math.exp(v) for v in logits)))
    return (i2t / n + t2i / n) / 2


def unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def test_matches_naive_reference():
    image, text = unit(7, 16, 0), unit(7, 16, 1)
    for scale in (1.0, 14.3, 100.0):
        got = clip_loss(image, text, torch.tensor(scale, dtype=torch.float64)).item()
        assert abs(got - naive_clip_loss(image, text, scale)) < 1e-4


def test_is_not_symmetric_in_a_wrong_way():
    # i2t and t2i differ for a non-symmetric similarity matrix; averaging both must match the reference, not
    # either direction alone (which a loss computing only one direction would return)
    image, text = unit(5, 8, 2), unit(5, 8, 3)
    logits = 10 * image @ text.T
    labels = torch.arange(5)
    one_way = F.cross_entropy(logits, labels).item()
    both = clip_loss(image, text, torch.tensor(10.0, dtype=torch.float64)).item()
    assert abs(both - naive_clip_loss(image, text, 10.0)) < 1e-6
    assert abs(both - one_way) > 1e-3


def test_matched_pairs_at_scale_100_give_almost_zero():
    features = torch.eye(8)  # orthogonal unit vectors: each pair matches only itself
    assert clip_loss(features, features, torch.tensor(100.0)).item() < 1e-6


def test_identical_features_give_log_n():
    n = 16
    features = F.normalize(torch.ones(n, 4), dim=-1)
    assert abs(clip_loss(features, features, torch.tensor(50.0)).item() - math.log(n)) < 1e-5


def test_computes_in_float32_from_bfloat16_features():
    image, text = unit(6, 8, 4).float(), unit(6, 8, 5).float()
    full = clip_loss(image, text, torch.tensor(100.0))
    half = clip_loss(image.bfloat16(), text.bfloat16(), torch.tensor(100.0))
    assert half.dtype == torch.float32
    assert abs(full.item() - half.item()) < 0.05


def test_rank_local_rows_average_to_the_full_loss():
    image, text = unit(12, 8, 6), unit(12, 8, 7)
    scale = torch.tensor(20.0, dtype=torch.float64)
    world, n = 3, 4
    parts = [clip_loss_rows(image[r * n:(r + 1) * n], text[r * n:(r + 1) * n], image, text, scale, r * n)
             for r in range(world)]
    assert abs(sum(p.item() for p in parts) / world - clip_loss(image, text, scale).item()) < 1e-6


def test_gradient_reaches_both_towers_and_temperature():
    image = unit(6, 8, 8).requires_grad_()
    text = unit(6, 8, 9).requires_grad_()
    log_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    clip_loss(image, text, log_scale.exp()).backward()
    assert image.grad.abs().sum() > 0 and text.grad.abs().sum() > 0 and log_scale.grad.abs() > 0
