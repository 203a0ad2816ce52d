"""SigLIP (transformers `SiglipModel`): logits = exp(logit_scale) * cos + logit_bias, a sigmoid per prompt. Text is
padded to the model's full text length, as the model was trained (anything else changes its embeddings)."""

from __future__ import annotations

from .base import Family, pooled, transformers_text_inputs


class SiglipFamily(Family):
    name = "siglip"
    title = "SigLIP"

    def matches(self, config: dict) -> bool:
        return config.get("model_type") == "siglip"

    def load(self, source, revision, token, dtype):
        from transformers import SiglipModel

        return SiglipModel.from_pretrained(source, revision=revision, token=token, dtype=dtype)

    def image_embedding(self, model, pixel_values):
        return pooled(model.get_image_features(pixel_values=pixel_values))

    def text_embedding(self, model, tokenizer, prompts, device, dummy_pixels):
        max_length = model.config.text_config.max_position_embeddings
        inputs = transformers_text_inputs(tokenizer, prompts, "max_length", max_length, device)
        scale, bias = float(model.logit_scale.float().exp()), float(model.logit_bias.float())
        return pooled(model.get_text_features(**inputs)), scale, bias


SIGLIP = SiglipFamily()
