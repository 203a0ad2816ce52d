"""ConceptCLIP's interface, loaded as the checkpoint's own remote code (`trust_remote_code`): `encode_image` /
`encode_text`, a forward that returns a dict with `image_features`, `text_features`, `logit_scale`, `logit_bias`
(the scale already exponentiated) and the concept head's `concept_logit_scale`, `concept_logit_bias`,
`image_token_features`, `text_token_features`. logits = logit_scale * cos + logit_bias, a sigmoid per concept.
Any remote-code checkpoint with this interface is treated as this family (see ../shared/REFERENCE.md)."""

from __future__ import annotations

from ..errors import UserError
from .base import Family

# OpenCLIP trained the text tower with a 77-token context; the model card's loop pads to the longest prompt. The tower
# rebuilds its mask from the pad tokens, so the padding length does not change an embedding (tests/test_models.py).
TEXT_CONTEXT = 77
TRANSFORMERS_5_HINT = (
    "this checkpoint's remote code does not load under transformers 5 (it never calls post_init); "
    "install 'transformers<5' for it"
)


class ConceptClipFamily(Family):
    name = "remote"  # the key OUTPUTs have stored since the first release
    title = "ConceptCLIP interface (remote code)"
    remote_code = True
    concept_head = True

    def matches(self, config: dict) -> bool:
        return bool(config.get("auto_map"))

    def load(self, source, revision, token, dtype):
        from transformers import AutoModel

        try:
            return AutoModel.from_pretrained(
                source, revision=revision, token=token, trust_remote_code=True, dtype=dtype
            )
        except AttributeError as exc:
            if "all_tied_weights_keys" in str(exc):
                raise UserError(f"model {source}: {TRANSFORMERS_5_HINT}") from None
            raise

    def image_embedding(self, model, pixel_values):
        return model.encode_image(pixel_values, normalize=False)[0]

    def text_embedding(self, model, tokenizer, prompts, device, dummy_pixels):
        # The documented forward, once: it returns the text features and the (already exponentiated) scales.
        text = tokenizer(prompts, padding=True, truncation=True, max_length=TEXT_CONTEXT, return_tensors="pt")
        out = model(pixel_values=dummy_pixels(), **{k: v.to(device) for k, v in text.items()})
        bias = float(out["logit_bias"]) if out.get("logit_bias") is not None else 0.0
        return out["text_features"], float(out["logit_scale"]), bias

    def has_class_token(self, vision_config) -> bool:
        # ConceptCLIP's tower is SigLIP's (no class token); another model with this interface may bring its own
        return "siglip" not in str(getattr(vision_config, "model_type", ""))

    def concept_tokens(self, model, tokenizer, names: list[str], device, dummy_pixels):
        """(text_proj(tokens) [K, T, D], the word-piece mask [K, T, 1], concept logit scale, bias) for the concept
        names: a concept's embedding for the concept head is the mean over its word pieces (no special tokens)."""
        text = tokenizer(
            names,
            padding=True,
            truncation=True,
            max_length=TEXT_CONTEXT,
            return_tensors="pt",
            return_special_tokens_mask=True,
        )
        words = ((text.pop("special_tokens_mask") == 0) & (text["attention_mask"] == 1)).unsqueeze(-1).float()
        out = model(pixel_values=dummy_pixels(), **{k: v.to(device) for k, v in text.items()})
        scale, bias = float(out["concept_logit_scale"]), float(out["concept_logit_bias"])
        return out["text_token_features"], words, scale, bias

    def patch_tokens(self, model, pixel_values):
        """(the unnormalised image embedding [B, D], image_proj(patch tokens) [B, P, D]) in one pass of the tower."""
        pooled, tokens = model.encode_image(pixel_values, normalize=False)
        return pooled, model.image_proj(tokens)


CONCEPTCLIP = ConceptClipFamily()
