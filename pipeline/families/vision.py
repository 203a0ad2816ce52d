"""Image towers without a text tower (`CLIPVisionModel`, `SiglipVisionModel` checkpoints): features-only runs. Their
embedding is the tower's pooled output (they have no projection)."""

from __future__ import annotations

from .base import Family, pooled


class VisionTowerFamily(Family):
    has_text = False

    def __init__(self, name: str, title: str, model_type: str, class_token: bool, loader: str):
        self.name, self.title, self.model_type, self.class_token, self.loader = (
            name,
            title,
            model_type,
            class_token,
            loader,
        )

    def matches(self, config: dict) -> bool:
        return config.get("model_type") == self.model_type

    def load(self, source, revision, token, dtype):
        import transformers

        return getattr(transformers, self.loader).from_pretrained(source, revision=revision, token=token, dtype=dtype)

    def image_embedding(self, model, pixel_values):
        return pooled(model(pixel_values=pixel_values))

    def image_tower(self, model):
        return model

    def vision_config(self, config):
        return config

    def vision_config_json(self, config: dict) -> dict:
        return config

    def embedding_width(self, config: dict) -> int:
        return int(config.get("hidden_size") or 768)  # the pooled output: a tower's config may name a projection_dim


CLIP_VISION = VisionTowerFamily("clip_vision", "CLIP image tower", "clip_vision_model", True, "CLIPVisionModel")
SIGLIP_VISION = VisionTowerFamily(
    "siglip_vision", "SigLIP image tower", "siglip_vision_model", False, "SiglipVisionModel"
)
