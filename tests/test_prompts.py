"""Prompt sets: YAML and text files on disk, their hash, their errors, and the ensembling of embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.prompts import Concept, PromptSet, ensemble, load_prompts


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_yaml_concepts_times_templates(tmp_path):
    path = write(
        tmp_path, "p.yaml", 'concepts: [tumor, stroma]\ntemplates: ["a histopathology image of {}", "{} tissue"]\n'
    )
    ps = load_prompts(str(path))
    assert isinstance(ps, PromptSet)
    assert ps.names == ["tumor", "stroma"]
    assert ps.concepts[0] == Concept("tumor", ("a histopathology image of tumor", "tumor tissue"))
    assert ps.all_prompts == [
        "a histopathology image of tumor",
        "tumor tissue",
        "a histopathology image of stroma",
        "stroma tissue",
    ]
    assert ps.counts == [2, 2]


def test_yaml_without_templates_uses_the_name(tmp_path):
    ps = load_prompts(str(write(tmp_path, "p.yml", "concepts: [tumor, stroma]\n")))
    assert ps.all_prompts == ["tumor", "stroma"] and ps.counts == [1, 1]


def test_yaml_per_concept_prompts(tmp_path):
    path = write(
        tmp_path,
        "p.yaml",
        """\
concepts:
  - tumor
  - name: necrosis
    prompts: ["necrotic tissue", "an image of necrosis", "dead cells"]
  - {name: stroma}
templates: ["a photo of {}", "{}"]
""",
    )
    ps = load_prompts(str(path))
    assert ps.names == ["tumor", "necrosis", "stroma"]
    assert ps.counts == [2, 3, 2]
    assert ps.concepts[1].prompts == ("necrotic tissue", "an image of necrosis", "dead cells")
    assert ps.concepts[2].prompts == ("a photo of stroma", "stroma")


def test_text_file_one_prompt_per_line(tmp_path):
    path = write(tmp_path, "p.txt", "# my prompts\n\na photo of a tumor\n  stroma tissue  \n\n# end\nnecrosis\n")
    ps = load_prompts(str(path))
    assert ps.names == ["a photo of a tumor", "stroma tissue", "necrosis"]
    assert ps.all_prompts == ps.names and ps.counts == [1, 1, 1]


def test_non_ascii_prompts(tmp_path):
    ps = load_prompts(
        str(write(tmp_path, "p.yaml", 'concepts: [tumeur, "nécrose", 腫瘍]\ntemplates: ["image de {}"]\n'))
    )
    assert ps.all_prompts == ["image de tumeur", "image de nécrose", "image de 腫瘍"]
    assert len(ps.set_hash) == 16


def test_set_hash(tmp_path):
    a = load_prompts(str(write(tmp_path, "a.yaml", 'concepts: [tumor, stroma]\ntemplates: ["a photo of {}"]\n')))
    same = load_prompts(
        str(
            write(
                tmp_path,
                "same.yaml",
                '# reformatted, same prompts\nconcepts:\n  - tumor\n  - stroma\ntemplates:\n  - "a photo of {}"\n',
            )
        )
    )
    explicit = load_prompts(
        str(
            write(
                tmp_path,
                "explicit.yaml",
                'concepts: [{name: tumor, prompts: ["a photo of tumor"]},\n'
                '           {name: stroma, prompts: ["a photo of stroma"]}]\n',
            )
        )
    )
    assert a.set_hash == same.set_hash == explicit.set_hash
    assert a.set_hash == load_prompts(str(tmp_path / "a.yaml")).set_hash  # stable across loads
    assert len(a.set_hash) == 16 and all(c in "0123456789abcdef" for c in a.set_hash)
    changed_prompt = load_prompts(
        str(write(tmp_path, "b.yaml", 'concepts: [tumor, stroma]\ntemplates: ["an image of {}"]\n'))
    )
    changed_order = load_prompts(
        str(write(tmp_path, "c.yaml", 'concepts: [stroma, tumor]\ntemplates: ["a photo of {}"]\n'))
    )
    changed_concept = load_prompts(
        str(write(tmp_path, "d.yaml", 'concepts: [tumor, fat]\ntemplates: ["a photo of {}"]\n'))
    )
    renamed = load_prompts(
        str(
            write(
                tmp_path,
                "e.yaml",
                'concepts: [{name: cancer, prompts: ["a photo of tumor"]},\n'
                '           {name: stroma, prompts: ["a photo of stroma"]}]\n',
            )
        )
    )
    hashes = {a.set_hash, changed_prompt.set_hash, changed_order.set_hash, changed_concept.set_hash, renamed.set_hash}
    assert len(hashes) == 5


def test_set_hash_is_deterministic_value():
    ps = PromptSet((Concept("tumor", ("a photo of tumor",)),))
    import hashlib
    import json

    canonical = json.dumps([["tumor", ["a photo of tumor"]]], ensure_ascii=False)
    assert ps.set_hash == hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("malformed.yaml", "concepts: [tumor, stroma\ntemplates: [\n", "not valid YAML"),
        ("empty_concepts.yaml", "concepts: []\n", "concepts"),
        ("no_concepts.yaml", "templates: ['{}']\n", "concepts"),
        ("no_placeholder.yaml", "concepts: [tumor]\ntemplates: ['a photo of tumor']\n", r"\{\}"),
        ("duplicate.yaml", "concepts: [tumor, stroma, tumor]\n", "twice"),
        ("duplicate_mixed.yaml", "concepts: [tumor, {name: tumor, prompts: [x]}]\n", "twice"),
        ("duplicate.txt", "tumor\nstroma\ntumor\n", "twice"),
        ("unknown_key.yaml", "concepts: [tumor]\ntemplate: ['{}']\n", "template"),
        ("not_mapping.yaml", "- tumor\n- stroma\n", "mapping"),
        ("empty_prompts.yaml", "concepts: [{name: tumor, prompts: []}]\n", "prompts"),
        ("bad_concept.yaml", "concepts: [42]\n", "concept"),
        ("empty.txt", "# only a comment\n\n", "no prompts"),
        ("empty.yaml", "", "mapping"),
    ],
)
def test_prompt_file_errors(tmp_path, name, text, match):
    path = write(tmp_path, name, text)
    with pytest.raises(UserError, match=match) as info:
        load_prompts(str(path))
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)  # one line


def test_missing_prompt_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(UserError, match="does not exist") as info:
        load_prompts(str(path))
    assert str(path) in str(info.value)
    with pytest.raises(UserError, match="does not exist"):
        load_prompts(str(tmp_path))  # a folder is not a prompt file


def test_unknown_key_is_named(tmp_path):
    path = write(tmp_path, "p.yaml", "concepts: [tumor]\nconcept_names: [x]\n")
    with pytest.raises(UserError, match="concept_names"):
        load_prompts(str(path))


def test_non_utf8_prompt_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("nécrose\n".encode("latin-1"))
    with pytest.raises(UserError, match="UTF-8") as info:
        load_prompts(str(path))
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------------------------------- ensemble
def unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_ensemble_one_prompt_per_concept_is_normalised_embedding():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(4, 16)).astype(np.float32) * np.array([[0.1], [3], [10], [1]], np.float32)
    out = ensemble(emb, [1, 1, 1, 1])
    assert out.shape == (4, 16) and out.dtype == np.float32
    np.testing.assert_allclose(out, unit(emb.astype(np.float64)), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)


def test_ensemble_several_prompts_normalise_average_renormalise():
    rng = np.random.default_rng(1)
    counts = [3, 1, 2]
    emb = rng.normal(size=(6, 8)) * rng.uniform(0.1, 20, size=(6, 1))  # very different norms
    out = ensemble(emb, counts)
    expected = []
    start = 0
    for n in counts:
        mean = unit(emb[start : start + n]).mean(axis=0)
        expected.append(mean / np.linalg.norm(mean))
        start += n
    np.testing.assert_allclose(out, np.stack(expected), rtol=0, atol=1e-6)
    # Not the same as averaging raw embeddings: a long vector must not dominate.
    raw = unit(emb[:3].mean(axis=0))
    assert not np.allclose(out[0], raw, atol=1e-3)


def test_ensemble_is_scale_invariant_per_prompt():
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(5, 12)).astype(np.float32)
    scaled = emb * np.array([[1], [100], [0.01], [5], [2]], np.float32)
    np.testing.assert_allclose(ensemble(emb, [2, 3]), ensemble(scaled, [2, 3]), rtol=0, atol=1e-6)
