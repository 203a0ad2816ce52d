"""What every model family implements: how to load it, encode images and text, and turn cosines into logits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal


class Family:
    """One family of checkpoints behind the pipeline's one interface.

    Subclasses set the class attributes and implement `matches`, `load`, `image_embedding` and (with a text tower)
    `text_embedding`. The `Encoder` (pipeline/models.py) keeps the device, the pixel buffers and the micro-batching;
    a family only says what its model computes. Every tensor a family returns is in the model's dtype, on the model's
    device; the Encoder normalises.
    """

    name: str  # the key OUTPUT identities store (`kind` in _dataset.json): never changes once released
    title: str  # how people read it (reports, messages)
    remote_code: bool = False  # loads the checkpoint's own Python: needs --trust-remote-code
    has_text: bool = True  # has a text tower: can score prompts
    probability: Literal["softmax", "sigmoid"] = "sigmoid"  # a logit's probability: over concepts, or per concept
    class_token: bool = False  # the image tower's sequence starts with a class token (has_class_token)
    concept_head: bool = False  # ConceptCLIP's patch-level concept head (--concept-maps)

    def matches(self, config: dict) -> bool:
        """Whether a checkpoint's config.json is one of this family's."""
        raise NotImplementedError

    def load(self, source: str, revision: str | None, token: str | None, dtype) -> Any:
        """The model, loaded with `from_pretrained` (on the CPU; the Encoder moves it)."""
        raise NotImplementedError

    def image_embedding(self, model, pixel_values) -> Any:
        """The projected image embedding [B, D], not normalised (ConceptCLIP's `normalize=False`)."""
        raise NotImplementedError

    def text_embedding(
        self, model, tokenizer, prompts: list[str], device, dummy_pixels: Callable[[], Any]
    ) -> tuple[Any, float, float]:
        """(text embeddings [N, D] as the model computes them for `prompts`, logit scale, logit bias): logits are
        scale * cos(image, text) + bias. `dummy_pixels()` gives one normalised image for models whose documented
        forward needs one."""
        raise NotImplementedError(f"{self.title} has no text tower")

    def image_tower(self, model) -> Any:
        """The image tower (a transformers vision model with `config` and `hidden_states`), or None."""
        return getattr(model, "vision_model", None)

    def vision_config(self, config) -> Any:
        """The image tower's configuration within the model's (a transformers config object), or None."""
        return getattr(config, "vision_config", None)

    def vision_config_json(self, config: dict) -> dict:
        """The same, within config.json read as a dict."""
        return config.get("vision_config") or {}

    def has_class_token(self, vision_config) -> bool:
        """Whether the image tower's sequence starts with a class token (for hidden-state features)."""
        return self.class_token

    def embedding_width(self, config: dict) -> int:
        """The width of `image_embedding`, from config.json (no model loaded)."""
        vision = self.vision_config_json(config)
        return int(config.get("projection_dim") or config.get("embed_dim") or vision.get("hidden_size") or 1152)

    def __reduce__(self):
        from . import named  # pickled by name (Ray hands specs to actors): the registry's instance on the other side

        return (named, (self.name,))

    def __repr__(self) -> str:
        return f"<family {self.name}: {self.title}>"


def pooled(output):
    """transformers 5 returns an output object from get_*_features, transformers 4 a tensor."""
    if hasattr(output, "pooler_output"):
        return output.pooler_output
    return output


def transformers_text_inputs(tokenizer, prompts: list[str], padding, max_length: int, device) -> dict:
    """What `model(**processor(text=...))` passes to a transformers text tower: input ids and, where the tokenizer
    gives one, the attention mask (SigLIP's gives none)."""
    text = tokenizer(prompts, padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v.to(device) for k, v in text.items() if k in ("input_ids", "attention_mask")}
