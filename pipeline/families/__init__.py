"""Model families: one adapter per family (one file each), chosen from the checkpoint's config.json by the registry
below. The rest of the pipeline asks a family what it can do (`has_text`, `remote_code`, `concept_head`,
`probability`, `class_token`) and never tests a family's name.

Adding a family: write `pipeline/families/<name>.py` with a `Family` subclass (see base.py) and one instance, and add
that instance to FAMILIES. Order matters only where two could match one config.json: the remote-code catch-all last.
"""

from __future__ import annotations

from .base import Family
from .clip import CLIP
from .conceptclip import CONCEPTCLIP
from .siglip import SIGLIP
from .vision import CLIP_VISION, SIGLIP_VISION

FAMILIES: tuple[Family, ...] = (CLIP, SIGLIP, CLIP_VISION, SIGLIP_VISION, CONCEPTCLIP)

__all__ = ["FAMILIES", "Family", "detect", "named"]


def detect(config: dict) -> Family | None:
    """The family of a checkpoint, from its config.json (None: not supported)."""
    return next((family for family in FAMILIES if family.matches(config)), None)


def named(name: str) -> Family:
    """The family an OUTPUT's identity names (`kind`); KeyError for a name no release used."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise KeyError(name)


def supported() -> str:
    """The families, for messages."""
    return ", ".join(family.title for family in FAMILIES)
