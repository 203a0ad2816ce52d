"""Configuration of the ConceptCLIP-interface test model (remote code: imports only transformers)."""

from transformers import BertConfig, PretrainedConfig, SiglipVisionConfig


class ConceptCLIPConfig(PretrainedConfig):
    """SigLIP vision tower + BERT text tower, both projected to `embed_dim`.

    The four `*_init` values are the numbers the model returns at initialisation: the two scales are stored as
    log-parameters and come back exponentiated, the two biases are raw.
    """

    model_type = "conceptclip"
    sub_configs = {"vision_config": SiglipVisionConfig, "text_config": BertConfig}

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        embed_dim=1152,
        logit_scale_init=10.0,
        logit_bias_init=-10.0,
        concept_logit_scale_init=10.0,
        concept_logit_bias_init=-10.0,
        **kwargs,
    ):
        if not isinstance(vision_config, SiglipVisionConfig):
            vision_config = SiglipVisionConfig(**(vision_config or {}))
        if not isinstance(text_config, BertConfig):
            text_config = BertConfig(**(text_config or {}))
        self.vision_config = vision_config
        self.text_config = text_config
        self.embed_dim = embed_dim
        self.logit_scale_init = logit_scale_init
        self.logit_bias_init = logit_bias_init
        self.concept_logit_scale_init = concept_logit_scale_init
        self.concept_logit_bias_init = concept_logit_bias_init
        super().__init__(**kwargs)
