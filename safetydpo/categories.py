"""The 7 harmful categories of CoProV2 and the names they go by.

The released CSVs spell categories inconsistently (``Harrasment``, ``self-harm``,
``sexual``...); every loader maps them through :func:`normalize_category` so the rest
of the system only ever sees the canonical names below.
"""

from __future__ import annotations

CATEGORIES: tuple[str, ...] = (
    "Hate",
    "Harassment",
    "Violence",
    "Self-harm",
    "Sexual",
    "Shocking",
    "Illegal Activity",
)

ALL = "all"  # the group of every category: the expert trained on all their pairs (the paper's "All-single")

_ALIASES: dict[str, str] = {
    "harrasment": "Harassment",
    "harrassment": "Harassment",
    "selfharm": "Self-harm",
    "self harm": "Self-harm",
    "illegal": "Illegal Activity",
    "illegal activities": "Illegal Activity",
    "illegal_activity": "Illegal Activity",
    "nudity": "Sexual",
}
_BY_KEY: dict[str, str] = {c.lower(): c for c in CATEGORIES} | _ALIASES


def normalize_category(name: str) -> str:
    """Canonical category for ``name`` (case, spacing and known misspellings forgiven).

    Raises ``ValueError`` naming the value for anything that is not one of the 7.
    """
    key = " ".join(str(name).strip().lower().split())
    if key in _BY_KEY:
        return _BY_KEY[key]
    raise ValueError(f"unknown category {name!r}; expected one of {list(CATEGORIES)}")


def category_slug(category: str) -> str:
    """Metric-name slug: ``Illegal Activity`` -> ``illegal_activity``, ``Self-harm`` -> ``self-harm``."""
    return normalize_category(category).lower().replace(" ", "_")
