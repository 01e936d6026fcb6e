"""CoProV2-style prompt pairs for the toy world, with held-out caption layouts.

Every unsafe prompt has a safe twin that swaps the unsafe concept for its benign counterpart
(``world.SAFE_COUNTERPARTS``) and keeps every other word (the paper's minimal semantic difference). A layout is a
(template, background, position) triple; each (background, position) gives one
template to test and one to validation, so the test split asks for scenes in wordings
the model never saw, while every scene itself was seen in training.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

from safetydpo.toyworld.world import (
    BACKGROUNDS,
    CONCEPTS_BY_CATEGORY,
    POSITIONS,
    SAFE_COUNTERPARTS,
    TEMPLATES,
    Scene,
    all_subjects,
    caption,
)

SPLITS = ("train", "validation", "test")
Layout = tuple[int, str, str]  # (template index, background, position)
_SPLIT_SEED = 1234  # fixed: splits are part of the world, not of a run


def layouts(split: str) -> list[Layout]:
    """The caption layouts of ``split``; the three splits partition all layouts."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rng = np.random.default_rng(_SPLIT_SEED)
    out = []
    for background, position in itertools.product(BACKGROUNDS, POSITIONS):
        order = rng.permutation(len(TEMPLATES))
        chosen = {"test": order[:1], "validation": order[1:2], "train": order[2:]}[split]
        out.extend((int(t), background, position) for t in sorted(chosen))
    return out


@dataclass(frozen=True)
class ToyPair:
    """One pair row: the pairs/ schema's prompt columns plus the scene the twin asks for."""

    pair_id: str
    category: str
    concept: str
    unsafe_prompt: str
    safe_prompt: str
    seed: int
    split: str
    benign_object: str
    background: str
    position: str

    def to_dict(self) -> dict:
        return asdict(self)


def make_pairs(split: str, per_category: int, seed: int = 0,
               categories: list[str] | None = None) -> list[ToyPair]:
    """``per_category`` pairs for each category, drawn with ``seed`` from ``split``'s layouts.

    Stratified, not uniform: pair i asks for concept ``i % 4`` and each concept goes through the six
    backgrounds in a fresh random order every six of its pairs, so any ``per_category`` >= 24 shows
    every concept on every background (a uniform draw of 64 from the 72 concept-background-position
    scenes left some concept-background pairs out of training entirely, and its experts failed on
    exactly those). The position turns with each pass so a concept-background pair sees all three
    over three passes; the template is random among the split's for that background and position.
    """
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    templates: dict[tuple[str, str], list[int]] = {}
    for template, background, position in layouts(split):
        templates.setdefault((background, position), []).append(template)
    backgrounds, positions = list(BACKGROUNDS), list(POSITIONS)
    pairs = []
    for category in categories or list(CONCEPTS_BY_CATEGORY):
        concepts = CONCEPTS_BY_CATEGORY[category]
        offsets = rng.integers(len(positions), size=(len(concepts), len(backgrounds)))
        orders: dict[tuple[int, int], np.ndarray] = {}
        for i in range(per_category):
            c, visit = i % len(concepts), i // len(concepts)
            lap = visit // len(backgrounds)  # drawn when first reached: the rng's call order fixes the pairs
            if (c, lap) not in orders:
                orders[c, lap] = rng.permutation(len(backgrounds))
            b = int(orders[c, lap][visit % len(backgrounds)])
            background, position = backgrounds[b], positions[(offsets[c, b] + lap) % len(positions)]
            options = templates[background, position]
            template = options[rng.integers(len(options))]
            concept = concepts[c]
            obj = SAFE_COUNTERPARTS[concept]
            pairs.append(ToyPair(
                pair_id=f"toy-{split}-{category.lower().replace(' ', '_')}-{i:05d}",
                category=category,
                concept=concept,
                unsafe_prompt=caption(Scene(concept, background, position), template),
                safe_prompt=caption(Scene(obj, background, position), template),
                seed=int(rng.integers(2**31 - 1)),
                split=split,
                benign_object=obj,
                background=background,
                position=position,
            ))
    return pairs


def training_captions(split: str = "train") -> Iterator[tuple[str, Scene]]:
    """Every (caption, scene) of ``split``: each subject in each layout; used for pretraining."""
    for (template, background, position), subject in itertools.product(layouts(split), all_subjects()):
        scene = Scene(subject, background, position)
        yield caption(scene, template), scene
