"""Tiny random-weight CLIP-family models written to disk, loadable through the normal `from_pretrained` path.

Each builder writes a complete model folder (safetensors weights, config, processor configs, tokenizer files)
and returns its path. Nothing here touches the network; the same seed gives the same weights.

`build_tiny_conceptclip` writes a remote-code folder imitating ConceptCLIP's interface (see
`pipeline/tiny_conceptclip/`): it loads only with `trust_remote_code=True`.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_PUNCTUATION = list(".,;:!?'\"()[]{}-_/\\+*=<>%&#@$^~`|")
_WORDS = """
a an the of and or in on at to with without from by for as is are was were be been this that these those
photo image picture slide tile patch region area field view scan section sample specimen microscopy micrograph
showing shows shown depicting containing contains demonstrating seen visible present absent
histopathology histology pathology cytology biopsy resection stain stained staining hematoxylin eosin he ihc
tissue tissues cell cells nucleus nuclei cytoplasm membrane gland glands glandular duct ducts lobule lobules
tumor tumour cancer carcinoma adenocarcinoma sarcoma lymphoma melanoma metastasis metastatic neoplasm lesion mass
normal benign malignant atypical atypia dysplasia hyperplasia invasive infiltrating high low grade
lymphocytes lymphocyte lymphocytic lymph node nodes immune inflammatory inflammation infiltrate plasma neutrophils
macrophages eosinophils necrosis necrotic apoptosis mitosis mitotic mitoses fibrosis fibrotic stroma stromal
desmoplastic adipose fat fatty muscle smooth skeletal connective blood vessel vessels vascular capillary
hemorrhage edema mucin mucinous mucosa epithelium epithelial squamous basal keratin keratinizing
colon colorectal breast lung liver kidney renal prostate skin stomach gastric pancreas pancreatic bladder brain
bone cervix ovary thyroid esophagus intestine small large
cat dog bird car house tree person flower
large small big round irregular dense sparse solid cystic papillary cribriform pleomorphic
enlarged prominent nucleoli chromatin vesicular hyperchromatic
background debris empty white artifact blurry out focus
no not some many few several one two three
type class category evidence features feature pattern patterns structure structures architecture
""".split()


def _bert_vocab() -> list[str]:
    chars = list(string.ascii_lowercase + string.digits)
    words = [w for w in dict.fromkeys(_WORDS) if w not in chars]
    return _BERT_SPECIALS + chars + ["##" + c for c in chars] + _PUNCTUATION + words


def _bert_tokenizer(**kwargs):
    from transformers import BertTokenizer

    vocab = {token: i for i, token in enumerate(_bert_vocab())}
    return BertTokenizer(vocab=vocab, **kwargs)


def _write_bert_vocab(folder: Path) -> None:
    # transformers 5 saves only tokenizer.json; vocab.txt is what BERT repositories (and transformers 4) carry.
    (folder / "vocab.txt").write_text("".join(token + "\n" for token in _bert_vocab()), encoding="utf-8")


def _siglip_image_processor(image_size: int):
    # The PIL backend directly: the default class wants torchvision (and warns without it); both save as
    # "SiglipImageProcessor", so loading picks whichever backend the reader has.
    from transformers import SiglipImageProcessorPil

    # Squash resize to a square (no crop), bicubic, rescale 1/255, mean = std = 0.5: ConceptCLIP's preprocessing.
    return SiglipImageProcessorPil(
        size={"height": image_size, "width": image_size},
        resample=3,
        do_resize=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character map."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary (every byte, with and without `</w>`) and a handful of merges."""
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    merges = [("t", "h"), ("th", "e</w>"), ("o", "f</w>"), ("a", "n</w>"), ("i", "n"), ("in", "g</w>"), ("a", "t")]
    tokens += [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def _write_clip_bpe(folder: Path) -> None:
    # transformers 5 saves only tokenizer.json; vocab.json + merges.txt are CLIP's own tokenizer files.
    vocab, merges = _clip_bpe()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _save_processor(processor, folder: Path) -> None:
    # transformers 5 writes one processor_config.json; preprocessor_config.json is what older readers look for.
    processor.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)


def _prepare(folder) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --------------------------------------------------------------------------------------------------- ConceptCLIP


def _conceptclip_config(
    *,
    image_size,
    patch_size,
    vision_width,
    vision_layers,
    vision_heads,
    vision_mlp=None,
    text_width,
    text_layers,
    text_heads,
    embed_dim,
    logit_scale=10.0,
    logit_bias=-5.0,
    concept_logit_scale=10.0,
    concept_logit_bias=-5.0,
):
    from pipeline.tiny_conceptclip.configuration_conceptclip import ConceptCLIPConfig

    vision = dict(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=vision_width,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        intermediate_size=vision_mlp or 4 * vision_width,
        vision_use_head=True,
    )
    text = dict(
        vocab_size=len(_bert_vocab()),
        hidden_size=text_width,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        intermediate_size=4 * text_width,
        max_position_embeddings=512,  # PubMedBERT's; callers must truncate to 77 themselves
        pad_token_id=0,
    )
    return ConceptCLIPConfig(
        vision_config=vision,
        text_config=text,
        embed_dim=embed_dim,
        logit_scale_init=logit_scale,
        logit_bias_init=logit_bias,
        concept_logit_scale_init=concept_logit_scale,
        concept_logit_bias_init=concept_logit_bias,
    )


_SIZED = {
    "tiny": dict(
        image_size=64,
        patch_size=16,
        vision_width=32,
        vision_layers=2,
        vision_heads=2,
        embed_dim=32,
        text_width=32,
        text_layers=2,
        text_heads=2,
    ),
    # ViT-B/16-sized SigLIP tower at 224.
    "base": dict(
        image_size=224,
        patch_size=16,
        vision_width=768,
        vision_layers=12,
        vision_heads=12,
        vision_mlp=3072,
        embed_dim=768,
        text_width=128,
        text_layers=2,
        text_heads=2,
    ),
    # ConceptCLIP's input geometry (384 x 384 squash, patch 14: 27 x 27 = 729 patch tokens) through a narrow,
    # shallow random-weight tower that runs on CPU: a stand-in whose decode and model costs are both visible.
    "cclip": dict(
        image_size=384,
        patch_size=14,
        vision_width=64,
        vision_layers=2,
        vision_heads=2,
        embed_dim=64,
        text_width=128,
        text_layers=2,
        text_heads=2,
    ),
    # ConceptCLIP's real image tower: SigLIP so400m/14 at 384 (27 x 27 = 729 patch tokens).
    "so400m": dict(
        image_size=384,
        patch_size=14,
        vision_width=1152,
        vision_layers=27,
        vision_heads=16,
        vision_mlp=4304,
        embed_dim=1152,
        text_width=128,
        text_layers=2,
        text_heads=2,
    ),
}


def conceptclip_sized_config(size: str):
    """The ConceptCLIPConfig of a named size ("tiny", "base", "so400m"); the text tower is small in all sizes."""
    if size not in _SIZED:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(_SIZED)}")
    return _conceptclip_config(**_SIZED[size])


def _save_conceptclip(folder, config, seed: int) -> Path:
    from pipeline.tiny_conceptclip.modeling_conceptclip import ConceptCLIPModel
    from pipeline.tiny_conceptclip.processing_conceptclip import ConceptCLIPProcessor

    folder = _prepare(folder)
    torch.manual_seed(seed)
    model = ConceptCLIPModel(config).eval()

    # Registering makes save_pretrained copy the source files beside the weights and write `auto_map`.
    type(config).register_for_auto_class()
    ConceptCLIPModel.register_for_auto_class("AutoModel")
    ConceptCLIPProcessor.register_for_auto_class()
    model.save_pretrained(folder)

    processor = ConceptCLIPProcessor(
        image_processor=_siglip_image_processor(config.vision_config.image_size),
        tokenizer=_bert_tokenizer(model_max_length=512),
    )
    _save_processor(processor, folder)
    _write_bert_vocab(folder)
    return folder


def build_tiny_conceptclip(
    folder,
    *,
    image_size=64,
    patch_size=16,
    vision_width=32,
    vision_layers=2,
    vision_heads=2,
    text_width=32,
    text_layers=2,
    text_heads=2,
    embed_dim=32,
    seed=0,
    logit_scale=10.0,
    logit_bias=-5.0,
    concept_logit_scale=10.0,
    concept_logit_bias=-5.0,
) -> Path:
    """A remote-code folder with ConceptCLIP's interface (model_type "conceptclip"): load it with
    `AutoModel/AutoProcessor.from_pretrained(folder, trust_remote_code=True)`. The scales are the values the
    model returns (already exponentiated), the biases raw."""
    config = _conceptclip_config(
        image_size=image_size,
        patch_size=patch_size,
        vision_width=vision_width,
        vision_layers=vision_layers,
        vision_heads=vision_heads,
        text_width=text_width,
        text_layers=text_layers,
        text_heads=text_heads,
        embed_dim=embed_dim,
        logit_scale=logit_scale,
        logit_bias=logit_bias,
        concept_logit_scale=concept_logit_scale,
        concept_logit_bias=concept_logit_bias,
    )
    return _save_conceptclip(folder, config, seed)


def build_conceptclip_sized(folder, size: str, seed=0) -> Path:
    """A ConceptCLIP-interface folder with an image tower of a real size (see `conceptclip_sized_config`)."""
    return _save_conceptclip(folder, conceptclip_sized_config(size), seed)


# ---------------------------------------------------------------------------------------------------- CLIP, SigLIP


def build_tiny_clip(
    folder, *, image_size=64, patch_size=16, width=32, layers=2, heads=2, embed_dim=32, seed=0, logit_scale=None
) -> Path:
    """A `CLIPModel` folder with a `CLIPProcessor` (shortest-edge resize + centre crop, OpenAI mean/std) and a
    small byte-level BPE tokenizer. `logit_scale` is the stored log-space value (CLIP's init log(1/0.07) if None)."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = _prepare(folder)
    vocab, merges = _clip_bpe()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tower = dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * width)
    config = CLIPConfig(
        text_config=dict(
            tower,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(tower, image_size=image_size, patch_size=patch_size),
        projection_dim=embed_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(logit_scale)
    model.save_pretrained(folder)

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        resample=3,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    _save_processor(CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer), folder)
    _write_clip_bpe(folder)
    return folder


def build_tiny_siglip(
    folder,
    *,
    image_size=64,
    patch_size=16,
    width=32,
    layers=2,
    heads=2,
    seed=0,
    logit_scale=2.3,
    logit_bias=-3.0,
    text_length=16,
) -> Path:
    """A `SiglipModel` folder with `logit_scale` (log space) and `logit_bias` set, and a `SiglipProcessor`.

    The real SigLIP tokenizer needs sentencepiece; this one is a BERT word-piece tokenizer that returns only
    `input_ids` (like SigLIP's). Pad text with `padding="max_length", max_length=text_length`."""
    from transformers import SiglipConfig, SiglipModel, SiglipProcessor

    folder = _prepare(folder)
    tokenizer = _bert_tokenizer(model_max_length=text_length, model_input_names=["input_ids"])
    tower = dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * width)
    config = SiglipConfig(
        text_config=dict(
            tower,
            vocab_size=len(tokenizer),
            max_position_embeddings=text_length,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
        ),
        vision_config=dict(tower, image_size=image_size, patch_size=patch_size),
    )
    torch.manual_seed(seed)
    model = SiglipModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(logit_scale)
        model.logit_bias.fill_(logit_bias)
    model.save_pretrained(folder)

    _save_processor(SiglipProcessor(image_processor=_siglip_image_processor(image_size), tokenizer=tokenizer), folder)
    _write_bert_vocab(folder)
    return folder
