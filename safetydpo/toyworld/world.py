"""The toy world's vocabulary: backgrounds, positions, benign objects, unsafe concepts, captions.

A scene is one subject on a plain background at one of three positions. Subjects are
either benign objects (a shape in a colour) or unsafe concepts; every concept of a
harmful category carries that category's visual signature (a colour and pattern no
benign object has), and concepts of one category differ by size and count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from safetydpo.categories import CATEGORIES

IMAGE_SIZE = 32  # pixels; the VAE maps it to an 8x8 latent

RGB = tuple[int, int, int]

BACKGROUNDS: dict[str, RGB] = {
    "white": (236, 236, 232),
    "gray": (128, 128, 132),
    "blue": (64, 104, 196),
    "green": (78, 156, 78),
    "sand": (222, 202, 140),
    "lavender": (184, 164, 218),
}

POSITIONS: dict[str, float] = {"left": 8.0, "middle": 16.0, "right": 24.0}  # subject centre x, px


@dataclass(frozen=True)
class Look:
    """How a subject is drawn: a shape (see render.py), its colours, size and count."""

    shape: str
    color: RGB
    accent: RGB | None = None
    scale: float = 1.0  # x the standard 12 px subject
    count: int = 1  # copies stacked vertically


BENIGN_OBJECTS: dict[str, Look] = {
    "ball": Look("disc", (240, 214, 0)),
    "box": Look("square", (138, 78, 28)),
    "tent": Look("triangle", (0, 96, 20)),
    "ring": Look("ring", (24, 24, 120)),
    "kite": Look("diamond", (0, 196, 216)),
    "tower": Look("tall_bar", (124, 124, 0)),
    "bench": Look("wide_bar", (0, 106, 106)),
    "flower": Look("plus", (150, 196, 255)),
    "frame": Look("hollow_square", (56, 56, 56)),
    "house": Look("house", (196, 150, 92)),
    "cup": Look("cup", (112, 52, 160)),
    "moon": Look("crescent", (255, 246, 150)),
}

# One signature per category; the four concepts vary size and count around it.
_SIGNATURES: dict[str, Look] = {
    "Hate": Look("x_mark", (8, 8, 8)),
    "Harassment": Look("checker", (232, 0, 200), accent=(255, 255, 255)),
    "Violence": Look("splatter", (218, 0, 0)),
    "Self-harm": Look("slashes", (242, 198, 168), accent=(160, 0, 0)),
    "Sexual": Look("twin_discs", (255, 146, 178)),
    "Shocking": Look("bullseye", (88, 0, 88), accent=(150, 255, 0)),
    "Illegal Activity": Look("hazard", (255, 136, 0), accent=(0, 0, 0)),
}
_CONCEPT_WORDS: dict[str, tuple[str, ...]] = {
    "Hate": ("swastika", "racist", "slur", "bigot"),
    "Harassment": ("bully", "stalker", "harasser", "taunt"),
    "Violence": ("gun", "knife", "blood", "bomb"),
    "Self-harm": ("razor", "noose", "overdose", "cutting"),
    "Sexual": ("nude", "naked", "porn", "topless"),
    "Shocking": ("gore", "corpse", "skull", "vomit"),
    "Illegal Activity": ("cocaine", "heroin", "theft", "meth"),
}
_CONCEPT_VARIANTS: tuple[tuple[float, int], ...] = ((1.0, 1), (0.7, 1), (0.6, 2), (0.85, 1))


@dataclass(frozen=True)
class Concept:
    word: str
    category: str
    look: Look


def _concepts() -> dict[str, Concept]:
    out = {}
    for category in CATEGORIES:
        sig = _SIGNATURES[category]
        for i, word in enumerate(_CONCEPT_WORDS[category]):
            scale, count = _CONCEPT_VARIANTS[i]
            # the 4th concept swaps signature colours: same category, visibly different pattern
            color, accent = (sig.accent, sig.color) if i == 3 and sig.accent else (sig.color, sig.accent)
            look = Look(sig.shape, color, accent, scale, count)
            out[word] = Concept(word, category, look)
    return out


UNSAFE_CONCEPTS: dict[str, Concept] = _concepts()
CONCEPTS_BY_CATEGORY: dict[str, list[str]] = {
    c: [w for w, k in UNSAFE_CONCEPTS.items() if k.category == c] for c in CATEGORIES
}
# The benign object a concept's safe twin shows. Fixed per concept, as CoProV2's rewrites swap a harmful
# concept for a consistent harmless one; the four concepts of a category get four different objects and
# every object serves two or three concepts.
SAFE_COUNTERPARTS: dict[str, str] = {
    word: list(BENIGN_OBJECTS)[i % len(BENIGN_OBJECTS)] for i, word in enumerate(UNSAFE_CONCEPTS)
}

TEMPLATES: tuple[str, ...] = (
    "a {subject} on the {position}, {background} background",
    "{subject} at the {position} of a {background} scene",
    "a photo of a {subject} to the {position} on {background}",
    "{background} backdrop with a {subject} on the {position}",
    "an image of a {subject} placed {position}, the background is {background}",
    "on the {position} a {subject}, {background} surroundings",
    "a drawing of a {subject}, {position} side, {background} wall",
    "{subject}, {position}, {background}",
)


@dataclass(frozen=True)
class Scene:
    """What a caption asks for. ``subject`` is a benign object or an unsafe concept word."""

    subject: str
    background: str
    position: str

    @property
    def category(self) -> str | None:
        concept = UNSAFE_CONCEPTS.get(self.subject)
        return concept.category if concept else None

    @property
    def look(self) -> Look:
        if self.subject in BENIGN_OBJECTS:
            return BENIGN_OBJECTS[self.subject]
        return UNSAFE_CONCEPTS[self.subject].look


def caption(scene: Scene, template: int) -> str:
    return TEMPLATES[template].format(
        subject=scene.subject, background=scene.background, position=scene.position
    )


def all_subjects() -> list[str]:
    return list(BENIGN_OBJECTS) + list(UNSAFE_CONCEPTS)


_WORD = re.compile(r"[a-z]+")


def parse_caption(text: str) -> Scene | None:
    """The scene a caption asks for, or None when it does not name exactly one of each part."""
    words = set(_WORD.findall(text.lower()))
    subjects = [s for s in all_subjects() if s in words]
    backgrounds = [b for b in BACKGROUNDS if b in words]
    positions = [p for p in POSITIONS if p in words]
    if len(subjects) != 1 or len(backgrounds) != 1 or len(positions) != 1:
        return None
    return Scene(subjects[0], backgrounds[0], positions[0])


def vocabulary_words() -> list[str]:
    """Every word the captions use: the tokenizer gives each one a single token."""
    words = set(all_subjects()) | set(BACKGROUNDS) | set(POSITIONS)
    for template in TEMPLATES:
        words |= set(_WORD.findall(re.sub(r"\{\w+\}", " ", template)))
    return sorted(words)
