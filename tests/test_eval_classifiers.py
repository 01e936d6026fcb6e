"""Classifiers on real models: a tiny random CLIP for Q16 / CLIP score, NudeNet's bundled ONNX
detector, the toy detector on ground-truth renders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import save_tiny_clip

from safetydpo.categories import CATEGORIES
from safetydpo.config import EvalConfig
from safetydpo.evaluation import classifiers as cl
from safetydpo.pipelines import png_bytes
from safetydpo.toyworld.render import render_scene
from safetydpo.toyworld.world import BENIGN_OBJECTS, CONCEPTS_BY_CATEGORY, Scene

NUDENET_LABELS = {
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED",
    "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED",
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    return str(save_tiny_clip(tmp_path_factory.mktemp("clip"), seed=0, max_positions=16))


def toy_images() -> tuple[np.ndarray, list[str]]:
    """One ground-truth render per category, then benign ones."""
    scenes = [Scene(words[0], "white", "middle") for words in CONCEPTS_BY_CATEGORY.values()]
    backgrounds = ("white", "blue", "sand", "gray")
    scenes += [Scene(obj, bg, "left") for obj, bg in zip(list(BENIGN_OBJECTS)[:4], backgrounds, strict=True)]
    return np.stack([render_scene(s) for s in scenes]), [f"a {s.subject} in the middle" for s in scenes]


def test_q16_flags_by_prompt_embedding_similarity(tiny_clip, tmp_path):
    images, prompts = toy_images()
    clip = cl.ClipEncoder(tiny_clip, torch.device("cpu"))
    emb = clip.images(images)
    assert emb.shape == (len(images), 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    # Synthetic Q16 prompts: "appropriate" = image 8's embedding, "inappropriate" = image 0's.
    path = tmp_path / "q16.npy"
    np.save(path, np.stack([emb[8], emb[0]]).astype(np.float16))
    out = cl.Q16(clip, path).classify(images[[0, 8]], prompts[:2])
    assert out["q16_flagged"].tolist() == [True, False]
    assert out["q16_score"][0] > 0.5 > out["q16_score"][1]
    # The rule itself: softmax(100 * cosine) over the two prompts, index 1.
    prompts_n = np.load(path).astype(np.float32)
    prompts_n /= np.linalg.norm(prompts_n, axis=1, keepdims=True)
    logits = 100 * emb[[0, 8]].astype(np.float64) @ prompts_n.T
    expected = 1 / (1 + np.exp(logits[:, 0] - logits[:, 1]))
    np.testing.assert_allclose(out["q16_score"], expected, rtol=1e-4)


def test_q16_rejects_wrong_shape_and_pickles(tiny_clip, tmp_path):
    clip = cl.ClipEncoder(tiny_clip, torch.device("cpu"))
    np.save(tmp_path / "wide.npy", np.zeros((2, 768), np.float16))
    with pytest.raises(ValueError, match=r"wide\.npy: shape \(2, 768\), expected \(2, 16\)"):
        cl.Q16(clip, tmp_path / "wide.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"obj\.npy: cannot read"):
        cl.Q16(clip, tmp_path / "obj.npy")


def test_clip_score_is_clipped_scaled_cosine(tiny_clip):
    images, prompts = toy_images()
    clip = cl.ClipEncoder(tiny_clip, torch.device("cpu"))
    scores = cl.ClipScore(clip).classify(images, prompts)["clip_score"]
    cosine = (clip.images(images) * clip.texts(prompts)).sum(1)
    np.testing.assert_allclose(scores, np.maximum(100 * cosine, 0), rtol=1e-5, atol=1e-4)
    assert scores.shape == (len(images),) and (scores >= 0).all() and (scores <= 100).all()


def test_nudenet_bundled_model_runs_offline_with_threshold():
    rng = np.random.default_rng(0)
    images = np.stack([np.full((96, 96, 3), (220, 180, 150), np.uint8),
                       rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)])
    strict = cl.NudeNet(threshold=0.6).classify(images, ["a", "b"])
    assert set(strict) == {"nudenet_score", "nudenet_flagged", "nudenet_labels"}
    assert strict["nudenet_score"].shape == (2,) and (strict["nudenet_score"] < 0.6).all()
    assert not strict["nudenet_flagged"].any()
    for labels in strict["nudenet_labels"]:
        assert set(filter(None, labels.split(","))) <= NUDENET_LABELS
    # score >= threshold: a zero threshold flags every image, even with no detection at all.
    assert cl.NudeNet(threshold=0.0).classify(images, ["a", "b"])["nudenet_flagged"].all()


def test_toy_detector_flags_unsafe_renders_not_safe_ones():
    images, prompts = toy_images()
    out = cl.ToyClassifier().classify(images, prompts)
    n = len(CATEGORIES)
    assert out["toy_flagged"][:n].all(), out["toy_score"][:n]
    assert not out["toy_flagged"][n:].any(), out["toy_score"][n:]
    assert out["toy_category"][:n].tolist() == list(CATEGORIES)
    assert out["toy_features"].shape == (len(images), 128)


def test_batch_classifier_ors_the_configured_classifiers(tiny_clip, tmp_path):
    images, prompts = toy_images()
    clip = cl.ClipEncoder(tiny_clip, torch.device("cpu"))
    emb = clip.images(images)
    np.save(tmp_path / "q16.npy", np.stack([emb[0], emb[8]]).astype(np.float16))  # flags image 8 only
    config = EvalConfig(classifiers=["q16", "toy"], q16_prompts_path=str(tmp_path / "q16.npy"),
                        clip_model=tiny_clip)
    batch = {"image": np.array([png_bytes(im) for im in images], dtype=object), "prompt": np.array(prompts)}
    out = cl.BatchClassifier(config)(batch)
    assert {"q16_score", "clip_score", "toy_score", "toy_features", "flagged"} <= set(out)
    np.testing.assert_array_equal(out["flagged"], out["q16_flagged"] | out["toy_flagged"])
    assert out["q16_flagged"][8] and out["flagged"][8]
    with pytest.raises(ValueError, match="q16_prompts_path is not set"):
        cl.build(EvalConfig(classifiers=["q16"]))
