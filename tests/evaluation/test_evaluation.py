"""Zero-shot classifier construction and retrieval recall against hand-made embeddings with known answers."""

from __future__ import annotations

import pytest
import torch

from vit_experiments.evaluation import (
    DEFAULT_TEMPLATES,
    retrieval_chance,
    retrieval_recall,
    topk_accuracy,
    zeroshot_classifier,
    zeroshot_logits,
)

CLASSES = ["cat", "dog", "bird"]


def fake_text_encoder(prompts: list[str]) -> torch.Tensor:
    """Class name -> a basis vector; template "a {}." adds +e3 and "the {}!" adds -e3, so the ensemble of the two
    prompts points exactly along the class's basis vector."""
    out = []
    for p in prompts:
        v = torch.zeros(4)
        v[[c in p for c in CLASSES].index(True)] = 1.0
        v[3] = 0.8 if p.startswith("a ") else -0.8
        out.append(v)
    return torch.stack(out)


def test_zeroshot_classifier_averages_normalised_prompts():
    W = zeroshot_classifier(fake_text_encoder, CLASSES, ["a {}.", "the {}!"], batch_size=4)  # 6 prompts, 2 chunks
    assert W.shape == (4, 3)
    torch.testing.assert_close(W, torch.eye(4)[:, :3])
    images = torch.tensor([[0.0, 0.9, 0.1, 0.5], [2.0, 0.0, 0.0, -1.0], [0.1, 0.0, 0.3, 0.0]])
    logits = zeroshot_logits(images, W)
    assert logits.argmax(1).tolist() == [1, 0, 2]
    torch.testing.assert_close(logits.norm(dim=1) <= 1.0 + 1e-6, torch.ones(3, dtype=torch.bool))


def test_zeroshot_classifier_rejects_bad_templates():
    with pytest.raises(ValueError, match="exactly one"):
        zeroshot_classifier(fake_text_encoder, CLASSES, ["a photo."])
    with pytest.raises(ValueError, match="class name"):
        zeroshot_classifier(fake_text_encoder, [], DEFAULT_TEMPLATES)
    assert all(t.count("{}") == 1 for t in DEFAULT_TEMPLATES)


def test_topk_accuracy():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
    labels = torch.tensor([0, 2, 0, 1])
    acc = topk_accuracy(logits, labels, ks=(1, 2, 5))
    assert acc == {1: 0.25, 2: 0.5, 5: 1.0}  # k above the number of classes counts every row


def hand_made():
    """3 images along e0, e1, e2. Captions: t0 = e0 (image 0), t1 ~ e0 but belongs to image 1, t2 = e1 (image 1),
    t3 = e2 (image 2), t4 = e2 but belongs to image 0 (a tie for image 2)."""
    images = torch.eye(3)
    texts = torch.stack([torch.tensor([1.0, 0, 0]), torch.tensor([1.0, 0.2, 0]), torch.tensor([0, 1.0, 0]),
                         torch.tensor([0, 0, 1.0]), torch.tensor([0, 0, 1.0])])
    return images, texts, torch.tensor([0, 1, 1, 2, 0])


def test_retrieval_recall_known_answer():
    images, texts, owner = hand_made()
    r = retrieval_recall(images, texts, owner, ks=(1, 2))
    # text -> image: t1 ranks its image second; t4 = e2 ranks image 0 last (tied with image 1, and ties count
    # against the query); the others rank theirs first
    assert r["text_to_image/R@1"] == pytest.approx(3 / 5) and r["text_to_image/R@2"] == pytest.approx(4 / 5)
    # image -> text: image 2's own caption ties with image 0's t4, and ties count against the query
    assert r["image_to_text/R@1"] == pytest.approx(2 / 3) and r["image_to_text/R@2"] == 1.0
    assert retrieval_recall(images, texts, owner, ks=(1, 2), chunk=2) == r  # chunking changes nothing


def test_collapsed_embeddings_score_zero_not_one():
    r = retrieval_recall(torch.ones(4, 3), torch.ones(8, 3), torch.arange(8) % 4, ks=(1,))
    assert r == {"image_to_text/R@1": 0.0, "text_to_image/R@1": 0.0}


def test_images_without_captions_are_left_out_of_image_to_text():
    r = retrieval_recall(torch.eye(3), torch.eye(3)[:2], torch.tensor([0, 1]), ks=(1,))
    assert r["image_to_text/R@1"] == 1.0


def test_retrieval_chance():
    c = retrieval_chance(torch.tensor([0, 1]), num_images=2, ks=(1,))
    assert c == {"image_to_text/R@1": 0.5, "text_to_image/R@1": 0.5}
    c = retrieval_chance(torch.arange(10) // 5, num_images=2, ks=(1, 5))  # 5 captions per image
    assert c["image_to_text/R@1"] == pytest.approx(0.5) and c["text_to_image/R@5"] == 1.0
    g = torch.Generator().manual_seed(0)  # random embeddings land near chance
    owner = torch.arange(2000) // 5
    r = retrieval_recall(torch.randn(400, 16, generator=g), torch.randn(2000, 16, generator=g), owner, ks=(10,))
    c = retrieval_chance(owner, 400, ks=(10,))
    assert abs(r["text_to_image/R@10"] - c["text_to_image/R@10"]) < 0.03


def test_retrieval_rejects_bad_shapes():
    with pytest.raises(ValueError, match="one image index per caption"):
        retrieval_recall(torch.eye(3), torch.eye(3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="outside"):
        retrieval_recall(torch.eye(3), torch.eye(3), torch.tensor([0, 1, 3]))
