"""Recall@K on hand-built embeddings, including the any-of-five rule for image -> text; the held-out loss."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip import clip_loss
from dataset import Split
from evaluate import paired_loss, retrieval_metrics


def one_hot(indices, dim):
    return torch.nn.functional.one_hot(torch.tensor(indices), dim).float()


def test_perfect_retrieval_is_100():
    # 3 images, 2 captions each; caption embeddings equal to their image's
    images = one_hot([0, 1, 2], 3)
    captions = one_hot([0, 0, 1, 1, 2, 2], 3)
    m = retrieval_metrics(images, captions, torch.tensor([0, 0, 1, 1, 2, 2]), ks=(1, 5))
    assert m["i2t_R@1"] == 100 and m["t2i_R@1"] == 100
    assert m["n_images"] == 3 and m["n_captions"] == 6


def test_image_to_text_counts_any_of_its_captions():
    # image 0's best caption is image 1's caption; its own SECOND caption ranks second -> hit at K=2, miss at K=1
    images = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    captions = torch.tensor([
        [0.0, 0.0, 1.0],  # caption 0 of image 0: orthogonal to it
        [0.9, 0.0, 0.0],  # caption 1 of image 0: close
        [1.0, 1.0, 0.0],  # caption of image 1, but even closer to image 0
    ])
    m = retrieval_metrics(images, captions, torch.tensor([0, 0, 1]), ks=(1, 2))
    # image 0: ranking [c2 (1.0), c1 (0.9), c0 (0)] -> first own caption at rank 2
    # image 1: ranking [c2 (1.0), ...] -> hit at rank 1
    assert m["i2t_R@1"] == 50.0
    assert m["i2t_R@2"] == 100.0


def test_text_to_image_ranks_all_images_per_caption():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    captions = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])  # of images 0, 2, 1
    owner = torch.tensor([0, 2, 1])
    m = retrieval_metrics(images, captions, owner, ks=(1, 2))
    # caption 1 (0.6, 0.8): image 1 scores 0.8, image 2 scores 0.98 -> its image 2 first
    assert m["t2i_R@1"] == 100.0
    m = retrieval_metrics(images, captions, torch.tensor([0, 1, 1]), ks=(1, 2, 3))
    # now caption 1 belongs to image 1, which it ranks second (0.98 > 0.8)
    assert abs(m["t2i_R@1"] - 200 / 3) < 1e-4 and m["t2i_R@2"] == 100.0


def test_matches_a_naive_computation_and_chunking_changes_nothing():
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(37, 8, generator=g), dim=-1)
    captions = torch.nn.functional.normalize(torch.randn(185, 8, generator=g), dim=-1)
    owner = torch.arange(37).repeat_interleave(5)
    sim = images @ captions.T
    for k in (1, 5, 10):
        i2t = sum(bool((owner[sim[i].argsort(descending=True)[:k]] == i).any()) for i in range(37)) / 37 * 100
        t2i = sum(bool(i in sim[:, c].argsort(descending=True)[:k].tolist()) for c, i in enumerate(owner.tolist()))
        t2i = t2i / 185 * 100
        for chunk in (7, 4096):
            m = retrieval_metrics(images, captions, owner, chunk=chunk)
            assert abs(m[f"i2t_R@{k}"] - i2t) < 1e-4 and abs(m[f"t2i_R@{k}"] - t2i) < 1e-4


def test_the_held_out_loss_pairs_each_image_with_its_jth_caption_in_turn():
    """paired_loss: caption slot j pairs every image with its j-th caption; slots are averaged (by hand: two slots
    of one batch each)."""
    split = Split("val", [f"{i}.jpg" for i in range(4)], np.arange(4), [""] * 8, np.array([0, 2, 4, 6, 8]))
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(4, 16, generator=g), dim=-1)
    texts = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    by_hand = (clip_loss(images, texts[[0, 2, 4, 6]], scale) + clip_loss(images, texts[[1, 3, 5, 7]], scale)) / 2
    assert paired_loss(images, texts, split, scale, 4) == pytest.approx(by_hand.item(), rel=1e-6)


def test_mean_recall_averages_every_recall_of_both_directions():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    captions = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    m = retrieval_metrics(images, captions, torch.tensor([0, 1, 1]), ks=(1, 2))
    recalls = [m[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in (1, 2)]  # six with the default ks=(1, 5, 10)
    assert len(set(recalls)) > 1  # the directions differ here, so leaving one out would show
    assert m["mean_recall"] == pytest.approx(sum(recalls) / 4)


def test_the_held_out_loss_covers_every_caption_of_images_with_uneven_counts():
    """Images with 1, 3, 2 and 3 captions: slot 0 pairs all four, slot 1 the three with a second caption, slot 2
    the two with a third; no caption of one image is ever paired with another image."""
    split = Split("val", [f"{i}.jpg" for i in range(4)], np.arange(4), [""] * 9, np.array([0, 1, 4, 6, 9]))
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(4, 16, generator=g), dim=-1)
    texts = F.normalize(torch.randn(9, 16, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    by_hand = (clip_loss(images, texts[[0, 1, 4, 6]], scale) + clip_loss(images[[1, 2, 3]], texts[[2, 5, 7]], scale)
               + clip_loss(images[[1, 3]], texts[[3, 8]], scale)) / 3
    assert paired_loss(images, texts, split, scale, 4) == pytest.approx(by_hand.item(), rel=1e-6)


def test_a_batch_of_one_image_left_over_adds_no_loss():
    """Five images in batches of two: the fifth alone has no negatives, and its zero loss must not dilute the mean."""
    split = Split("val", [f"{i}.jpg" for i in range(5)], np.arange(5), [""] * 5, np.arange(6))
    g = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(5, 16, generator=g), dim=-1)
    texts = F.normalize(torch.randn(5, 16, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    by_hand = (clip_loss(images[:2], texts[:2], scale) + clip_loss(images[2:4], texts[2:4], scale)) / 2
    assert paired_loss(images, texts, split, scale, 2) == pytest.approx(by_hand.item(), rel=1e-6)
