"""Image grids for MLflow artifacts: rows of images with a label per row and per column.

Generation logs unsafe-vs-safe twins per category, evaluation and experts log before/after
samples; all go through :func:`image_grid` so every grid reads the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_PAD = 4  # px between cells
_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)


def image_grid(rows: Sequence[Sequence[np.ndarray | None]], row_labels: Sequence[str] | None = None,
               col_labels: Sequence[str] | None = None, cell: int = 96, font_size: int = 12) -> Image.Image:
    """A grid of uint8 HxWx3 images, each resized to ``cell`` x ``cell`` px (enlarged by nearest
    neighbour so 32-px toy images stay sharp, shrunk by Lanczos). Short rows and ``None`` leave blank cells."""
    if not rows or not any(image is not None for r in rows for image in r):
        raise ValueError("image_grid needs at least one image")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows")
    font = ImageFont.load_default(size=font_size)
    n_cols = max(len(r) for r in rows)
    left = (max(int(font.getlength(label)) for label in row_labels) + 2 * _PAD) if row_labels else 0
    top = font_size + 2 * _PAD if col_labels else 0
    step = cell + _PAD
    canvas = Image.new("RGB", (left + n_cols * step + _PAD, top + len(rows) * step + _PAD), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(col_labels or []):
        draw.text((left + _PAD + j * step, _PAD), label, fill=_TEXT, font=font)
    for i, images in enumerate(rows):
        y = top + _PAD + i * step
        if row_labels:
            draw.text((_PAD, y + cell // 2 - font_size // 2), row_labels[i], fill=_TEXT, font=font)
        for j, image in enumerate(images):
            if image is None:
                continue
            tile = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
            resample = Image.Resampling.NEAREST if tile.width <= cell else Image.Resampling.LANCZOS
            canvas.paste(tile.resize((cell, cell), resample), (left + _PAD + j * step, y))
    return canvas
