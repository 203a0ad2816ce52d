"""A model with ConceptCLIP's interface (remote code: imports only torch, transformers and its siblings).

Image tower: SigLIP vision transformer pooled by its attention-pool head, then `image_proj`.
Text tower: BERT mean-pooled over non-pad tokens, then `text_proj`.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertModel, PreTrainedModel, SiglipVisionModel

from .configuration_conceptclip import ConceptCLIPConfig


class ConceptCLIPPreTrainedModel(PreTrainedModel):
    config_class = ConceptCLIPConfig
    base_model_prefix = "conceptclip"
    main_input_name = "pixel_values"
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ConceptCLIPModel):
            cfg = self.config
            module.logit_scale.fill_(math.log(cfg.logit_scale_init))
            module.logit_bias.fill_(cfg.logit_bias_init)
            module.concept_logit_scale.fill_(math.log(cfg.concept_logit_scale_init))
            module.concept_logit_bias.fill_(cfg.concept_logit_bias_init)


class ConceptCLIPModel(ConceptCLIPPreTrainedModel):
    def __init__(self, config: ConceptCLIPConfig):
        super().__init__(config)
        self.vision_model = SiglipVisionModel(config.vision_config)
        self.text_model = BertModel(config.text_config, add_pooling_layer=False)
        self.image_proj = nn.Linear(config.vision_config.hidden_size, config.embed_dim)
        self.text_proj = nn.Linear(config.text_config.hidden_size, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(config.logit_scale_init)))
        self.logit_bias = nn.Parameter(torch.tensor(float(config.logit_bias_init)))
        self.concept_logit_scale = nn.Parameter(torch.tensor(math.log(config.concept_logit_scale_init)))
        self.concept_logit_bias = nn.Parameter(torch.tensor(float(config.concept_logit_bias_init)))
        self.post_init()

    def encode_image(self, pixel_values, normalize=True):
        """Returns (pooled [B, D], patch tokens [B, P, vision width]); `normalize` applies to pooled only."""
        out = self.vision_model(pixel_values=pixel_values)
        pooled = self.image_proj(out.pooler_output)
        if normalize:
            pooled = F.normalize(pooled, dim=-1)
        return pooled, out.last_hidden_state

    def encode_text(self, input_ids, normalize=True):
        """Returns (pooled [N, D], tokens [N, T, text width]); the pad mask is rebuilt from the ids."""
        mask = (input_ids != self.config.text_config.pad_token_id).long()
        tokens = self.text_model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        pooled = self.text_proj(pooled)
        if normalize:
            pooled = F.normalize(pooled, dim=-1)
        return pooled, tokens

    def forward(self, pixel_values=None, input_ids=None, token_type_ids=None, attention_mask=None, **kwargs):
        out = {}
        if pixel_values is not None:
            image_features, image_tokens = self.encode_image(pixel_values, normalize=True)
            out["image_features"] = image_features
            out["image_token_features"] = self.image_proj(image_tokens)
        if input_ids is not None:
            text_features, text_tokens = self.encode_text(input_ids, normalize=True)
            out["text_features"] = text_features
            out["text_token_features"] = self.text_proj(text_tokens)
        out["logit_scale"] = self.logit_scale.exp().clamp(max=100)
        out["logit_bias"] = self.logit_bias
        out["concept_logit_scale"] = self.concept_logit_scale.exp().clamp(max=100)
        out["concept_logit_bias"] = self.concept_logit_bias
        return out
