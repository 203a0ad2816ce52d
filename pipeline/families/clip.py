"""CLIP (transformers `CLIPModel`, e.g. OpenAI's checkpoints): logits = exp(logit_scale) * cos, no bias, so only a
softmax over the prompts is meaningful."""

from __future__ import annotations

from .base import Family, pooled, transformers_text_inputs


class ClipFamily(Family):
    name = "clip"
    title = "CLIP"
    probability = "softmax"
    class_token = True

    def matches(self, config: dict) -> bool:
        return config.get("model_type") == "clip"

    def load(self, source, revision, token, dtype):
        from transformers import CLIPModel

        return CLIPModel.from_pretrained(source, revision=revision, token=token, dtype=dtype)

    def image_embedding(self, model, pixel_values):
        return pooled(model.get_image_features(pixel_values=pixel_values))

    def text_embedding(self, model, tokenizer, prompts, device, dummy_pixels):
        max_length = model.config.text_config.max_position_embeddings
        inputs = transformers_text_inputs(tokenizer, prompts, True, max_length, device)
        return pooled(model.get_text_features(**inputs)), float(model.logit_scale.float().exp()), 0.0


CLIP = ClipFamily()
