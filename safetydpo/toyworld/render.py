"""Ground-truth renderer: draws the image a caption asks for.

Used to pretrain the toy model and its detector, never as DPO data (DPO images come
from the model itself, as in the paper). Shapes are drawn at 4x and box-filtered down,
so edges are anti-aliased like a decoder's output.
"""

from __future__ import annotations

import numpy as np

from safetydpo.toyworld.world import BACKGROUNDS, IMAGE_SIZE, POSITIONS, Look, Scene

_SUPERSAMPLE = 4
_HALF_SIZE = 6.0  # px: half the side of a scale-1 subject


def _shape(shape: str, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask, accent_mask) of a shape in unit coordinates (u right, v down, |u|,|v| <= 1)."""
    au, av, r = np.abs(u), np.abs(v), np.hypot(u, v)
    box = (au <= 0.9) & (av <= 0.9)
    none = np.zeros_like(u, dtype=bool)
    if shape == "disc":
        return r <= 1.0, none
    if shape == "square":
        return (au <= 0.85) & (av <= 0.85), none
    if shape == "triangle":
        return (av <= 0.85) & (au <= (v + 0.85) / 1.7), none
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55), none
    if shape == "diamond":
        return au + av <= 1.0, none
    if shape == "tall_bar":
        return (au <= 0.35) & (av <= 1.0), none
    if shape == "wide_bar":
        return (au <= 1.0) & (av <= 0.35), none
    if shape == "plus":
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0)), none
    if shape == "hollow_square":
        m = np.maximum(au, av)
        return (m <= 0.9) & (m >= 0.55), none
    if shape == "house":
        walls = (au <= 0.7) & (v >= 0.0) & (v <= 0.85)
        roof = (v < 0.0) & (v >= -0.95) & (au <= (v + 0.95) * 0.95)
        return walls | roof, none
    if shape == "cup":
        outer = (au <= 0.8) & (v >= -0.6) & (v <= 0.8)
        inner = (au <= 0.45) & (v >= -0.6) & (v <= 0.45)
        return outer & ~inner, none
    if shape == "crescent":
        return (r <= 1.0) & (np.hypot(u - 0.5, v + 0.15) > 0.75), none
    if shape == "x_mark":
        return ((np.abs(u - v) <= 0.42) | (np.abs(u + v) <= 0.42)) & (np.maximum(au, av) <= 1.0), none
    if shape == "checker":
        checks = (np.floor((u + 1) * 2) + np.floor((v + 1) * 2)) % 2 == 0
        return box, box & checks
    if shape == "splatter":
        blob = r <= 0.65
        for cu, cv in ((0.85, -0.75), (-0.8, 0.7), (0.75, 0.8), (-0.9, -0.55)):
            blob |= np.hypot(u - cu, v - cv) <= 0.22
        return blob, none
    if shape == "slashes":
        return box, box & (((u + v) % 0.6) < 0.2)
    if shape == "twin_discs":
        return (np.hypot(u - 0.45, v) <= 0.55) | (np.hypot(u + 0.45, v) <= 0.55), none
    if shape == "bullseye":
        return r <= 1.0, (r <= 1.0) & (np.floor(r * 3) % 2 == 0)
    if shape == "hazard":
        return box, box & (np.floor((u + v) * 1.5) % 2 == 0)
    raise ValueError(f"unknown shape {shape!r}")


def _jitter_color(color: tuple[int, int, int], rng: np.random.Generator | None, amount: float) -> np.ndarray:
    c = np.asarray(color, dtype=np.float32)
    return c if rng is None else c + rng.uniform(-amount, amount, size=3)


def render_scene(scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
    """``scene`` as a uint8 (32, 32, 3) array; ``rng`` adds small jitter (None: canonical)."""
    n = IMAGE_SIZE * _SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / _SUPERSAMPLE
    x, y = np.meshgrid(coords, coords)
    canvas = np.empty((n, n, 3), dtype=np.float32)
    canvas[:] = _jitter_color(BACKGROUNDS[scene.background], rng, 10)
    look: Look = scene.look
    scale = look.scale * (1.0 if rng is None else rng.uniform(0.92, 1.08))
    half = _HALF_SIZE * scale
    cx = POSITIONS[scene.position] + (0.0 if rng is None else rng.uniform(-1.5, 1.5))
    cy = IMAGE_SIZE / 2 + (0.0 if rng is None else rng.uniform(-1.5, 1.5))
    offsets = [0.0] if look.count == 1 else np.linspace(-(half + 1), half + 1, look.count)
    color = _jitter_color(look.color, rng, 12)
    accent = None if look.accent is None else _jitter_color(look.accent, rng, 12)
    for dy in offsets:
        mask, accent_mask = _shape(look.shape, (x - cx) / half, (y - cy - dy) / half)
        canvas[mask] = color
        if accent is not None:
            canvas[accent_mask] = accent
    small = canvas.reshape(IMAGE_SIZE, _SUPERSAMPLE, IMAGE_SIZE, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def render_background(background: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """An empty scene: the detector's example of 'no object, no category'."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    img[:] = _jitter_color(BACKGROUNDS[background], rng, 10)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
