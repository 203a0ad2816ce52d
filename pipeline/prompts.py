"""Prompt sets: concepts, their templates, and the ensembling of template embeddings.

YAML form::

    concepts: [tumor, stroma, {name: necrosis, prompts: ["necrotic tissue", "an image of necrosis"]}]
    templates: ["a histopathology image of {}", "{} tissue"]

A plain text file holds one prompt per line; each line is its own concept (blank lines and ``#`` comments skipped).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from .errors import UserError, first_line


@dataclass(frozen=True)
class Concept:
    name: str
    prompts: tuple[str, ...]


@dataclass(frozen=True)
class PromptSet:
    concepts: tuple[Concept, ...]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.concepts]

    @property
    def all_prompts(self) -> list[str]:
        """Every prompt, concept by concept (the order `ensemble` expects)."""
        return [p for c in self.concepts for p in c.prompts]

    @property
    def counts(self) -> list[int]:
        return [len(c.prompts) for c in self.concepts]

    @property
    def set_hash(self) -> str:
        canonical = json.dumps([[c.name, list(c.prompts)] for c in self.concepts], ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _fill(template: str, concept: str, source: str) -> str:
    if "{}" not in template:
        raise UserError(f"prompt file {source}: template {template!r} has no '{{}}' where the concept goes")
    return template.replace("{}", concept)


def parse_prompt_yaml(data: object, source: str) -> PromptSet:
    if not isinstance(data, dict):
        raise UserError(f"prompt file {source} must be a mapping with 'concepts' and 'templates'")
    unknown = set(data) - {"concepts", "templates"}
    if unknown:
        raise UserError(
            f"prompt file {source}: unknown key(s) {sorted(unknown, key=str)}; expected 'concepts' and 'templates'"
        )
    raw_concepts = data.get("concepts")
    if not isinstance(raw_concepts, list) or not raw_concepts:
        raise UserError(f"prompt file {source}: 'concepts' must be a non-empty list")
    templates = data.get("templates", ["{}"])
    if isinstance(templates, str):
        templates = [templates]
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
        raise UserError(f"prompt file {source}: 'templates' must be a non-empty list of strings with '{{}}'")
    concepts: list[Concept] = []
    for item in raw_concepts:
        if isinstance(item, str) and item.strip():
            name = item.strip()
            prompts = tuple(_fill(t, name, source) for t in templates)
        elif isinstance(item, dict) and isinstance(item.get("name"), str) and item["name"].strip():
            name = item["name"].strip()
            own = item.get("prompts")
            if own is None:
                prompts = tuple(_fill(t, name, source) for t in templates)
            elif isinstance(own, list) and own and all(isinstance(p, str) and p.strip() for p in own):
                prompts = tuple(own)
            else:
                raise UserError(f"prompt file {source}: concept {name!r} needs a non-empty list of 'prompts'")
        else:
            raise UserError(
                f"prompt file {source}: each concept must be a non-empty string or "
                f"{{name: ..., prompts: [...]}}, got {item!r}"
            )
        concepts.append(Concept(name, prompts))
    return _checked(concepts, source)


def _checked(concepts: list[Concept], source: str) -> PromptSet:
    seen: set[str] = set()
    for c in concepts:
        if c.name in seen:
            raise UserError(f"prompt file {source}: concept {c.name!r} appears twice")
        seen.add(c.name)
    return PromptSet(tuple(concepts))


def load_prompts(path: str) -> PromptSet:
    """Read a prompt set from a YAML or text file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompt file {path} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"prompt file {path} is not UTF-8 text") from None
    if p.suffix.lower() in (".yaml", ".yml", ".json"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UserError(f"prompt file {path} is not valid YAML: {first_line(exc)}") from None
        except RecursionError:  # nested deeper than the parser goes
            raise UserError(f"prompt file {path} is not valid YAML: nested too deeply") from None
        return parse_prompt_yaml(data, path)
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise UserError(f"prompt file {path} holds no prompts")
    return _checked([Concept(ln, (ln,)) for ln in lines], path)


def ensemble(prompt_embeddings: np.ndarray, counts: list[int]) -> np.ndarray:
    """Per concept: L2-normalise each prompt's embedding, average, renormalise (CLIP practice)."""
    emb = np.asarray(prompt_embeddings, dtype=np.float32)
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    out = np.empty((len(counts), emb.shape[1]), dtype=np.float32)
    start = 0
    for i, n in enumerate(counts):
        mean = emb[start : start + n].mean(axis=0)
        out[i] = mean / np.linalg.norm(mean)
        start += n
    return out
