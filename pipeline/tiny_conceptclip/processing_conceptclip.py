"""Processor of the ConceptCLIP-interface test model (remote code: imports only transformers).

The sub-processors are resolved by AutoImageProcessor / AutoTokenizer from the saved configs
(a SigLIP image processor and a BERT tokenizer).
"""

from transformers import ProcessorMixin


class ConceptCLIPProcessor(ProcessorMixin):
    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer)
