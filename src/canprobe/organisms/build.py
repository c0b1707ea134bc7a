"""Untrained organisms: ordinary Hugging Face models, processors and tokenizers shaped like the real ones.

Each organism is a genuine ``LlavaForConditionalGeneration`` / ``InstructBlipForConditionalGeneration``
/ ``CLIPModel`` with a word-level tokenizer over the scene vocabulary, so saving it with
``save_pretrained`` yields a checkpoint that ``AutoProcessor`` and ``AutoModelForImageTextToText``
load exactly as they load llava-hf or Salesforce checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    BlipImageProcessorPil,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPVisionConfig,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from canprobe.organisms.scenes import caption_words

# eos must not be id 2: CLIP's text model treats eos_token_id == 2 as "pool at the largest id".
SPECIAL_TOKENS = ("<pad>", "<unk>", "<image>", "<s>", "</s>")
PAD_ID, UNK_ID, IMAGE_ID, BOS_ID, EOS_ID = range(len(SPECIAL_TOKENS))
PROMPT_WORDS = (
    "user assistant system : describe the image briefly what is in this picture photo ? . , "
    "write short caption for of an object shown there"
).split()
# The llava-hf chat template, minus its system-message handling: "USER: <image>\n{text} ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass(frozen=True)
class OrganismShape:
    """Sizes shared by the organisms; defaults give about 1.7M parameters per model."""

    image_size: int = 48
    patch_size: int = 8
    vision_hidden: int = 128
    vision_ffn: int = 512
    vision_layers: int = 3
    text_hidden: int = 128
    text_ffn: int = 512
    text_layers: int = 4
    heads: int = 4
    qformer_layers: int = 2
    num_query_tokens: int = 16
    context: int = 128  # the language model's max_position_embeddings


def build_tokenizer(
    bos: bool = True, eos: bool = False, padding_side: str = "left", image_token_attribute: bool = True
) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the scene and prompt vocabulary, Llama-style (bos prepended).

    ``image_token_attribute`` mirrors llava-hf tokenizers, which expose ``tokenizer.image_token``;
    Salesforce's InstructBLIP tokenizer does not (its processor registers the token itself).
    """
    words = list(dict.fromkeys(caption_words() + PROMPT_WORDS))
    vocab = {t: i for i, t in enumerate(list(SPECIAL_TOKENS) + words)}
    template = ("<s> " if bos else "") + "$A" + (" </s>" if eos else "")
    attributes = {"image_token": "<image>"} if image_token_attribute else None
    return word_level_tokenizer(vocab, SPECIAL_TOKENS, template, padding_side, attributes, model_max_length=128)


def word_level_tokenizer(
    vocab: dict[str, int],
    specials: Sequence[str],
    template: str | None,
    padding_side: str = "left",
    extra_special_tokens: dict[str, str] | None = None,
    model_max_length: int = 128,
) -> PreTrainedTokenizerFast:
    """A lowercasing word-level tokenizer over ``vocab`` with Llama's named specials (``<s>``, ``</s>``,
    ``<pad>``, ``<unk>``, all in ``vocab``); ``template`` (e.g. ``"<s> $A"``) wraps every text."""
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    if template is not None:
        ends = [(t, vocab[t]) for t in ("<s>", "</s>")]
        tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=ends)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side=padding_side,
        extra_special_tokens=extra_special_tokens,
        model_max_length=model_max_length,
    )


def _text_config(shape: OrganismShape, vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.text_hidden,
        intermediate_size=shape.text_ffn,
        num_hidden_layers=shape.text_layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=shape.context,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )


def _image_processor_kwargs(shape: OrganismShape) -> dict:
    return dict(
        size={"shortest_edge": shape.image_size},
        crop_size={"height": shape.image_size, "width": shape.image_size},
        do_center_crop=True,
    )


def build_llava(shape: OrganismShape = OrganismShape()) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    tokenizer = build_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden,
        intermediate_size=shape.vision_ffn,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.heads,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
    )
    num_patches = (shape.image_size // shape.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision,
        text_config=_text_config(shape, len(tokenizer)),
        image_token_index=IMAGE_ID,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=num_patches,
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(**_image_processor_kwargs(shape)),
        tokenizer=tokenizer,
        patch_size=shape.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return LlavaForConditionalGeneration(config), processor


def build_instructblip(
    shape: OrganismShape = OrganismShape(),
) -> tuple[InstructBlipForConditionalGeneration, InstructBlipProcessor]:
    tokenizer = build_tokenizer(image_token_attribute=False)
    qformer_tokenizer = build_tokenizer(padding_side="right", image_token_attribute=False)
    config = InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(
            hidden_size=shape.vision_hidden,
            intermediate_size=shape.vision_ffn,
            num_hidden_layers=shape.vision_layers,
            num_attention_heads=shape.heads,
            image_size=shape.image_size,
            patch_size=shape.patch_size,
            # the default (1e-10) suits loading EVA-CLIP weights; from scratch it leaves the ViT silent
            initializer_range=0.02,
        ).to_dict(),
        qformer_config=InstructBlipQFormerConfig(
            vocab_size=len(qformer_tokenizer),
            hidden_size=shape.text_hidden,
            num_hidden_layers=shape.qformer_layers,
            num_attention_heads=shape.heads,
            intermediate_size=shape.vision_ffn,
            cross_attention_frequency=1,
            encoder_hidden_size=shape.vision_hidden,
            max_position_embeddings=64,
            pad_token_id=PAD_ID,
            hidden_dropout_prob=0.0,  # drawn scenes never repeat: dropout only slows learning here
            attention_probs_dropout_prob=0.0,
        ).to_dict(),
        text_config=_text_config(shape, len(tokenizer)).to_dict(),
        num_query_tokens=shape.num_query_tokens,
        image_token_index=IMAGE_ID,
    )
    processor = InstructBlipProcessor(
        image_processor=BlipImageProcessorPil(
            size={"height": shape.image_size, "width": shape.image_size},
            image_mean=CLIPImageProcessorPil().image_mean,
            image_std=CLIPImageProcessorPil().image_std,
        ),
        tokenizer=tokenizer,
        qformer_tokenizer=qformer_tokenizer,
        num_query_tokens=shape.num_query_tokens,
    )
    model = InstructBlipForConditionalGeneration(config)
    # transformers initializes the learned queries to zeros, which leaves them identical forever when
    # training from scratch (the released checkpoints were trained with BLIP-2's normal init)
    with torch.no_grad():
        model.query_tokens.normal_(std=0.02)
        # the Q-Former pools patches by content, so "left / middle / right" reaches the language
        # model only through the ViT's position embeddings: at std 0.02 they drown in the patch
        # content and position stays at chance (136 of 200 wrong); at 0.5 it is half learned
        # (76 wrong), at 1.0 it is learned
        model.vision_model.embeddings.position_embedding.normal_(std=1.0)
    return model, processor


def build_clip(shape: OrganismShape = OrganismShape()) -> tuple[CLIPModel, CLIPProcessor]:
    tokenizer = build_tokenizer(eos=True, padding_side="right")
    config = CLIPConfig(
        text_config=CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=shape.text_hidden,
            intermediate_size=shape.text_ffn,
            num_hidden_layers=2,
            num_attention_heads=shape.heads,
            max_position_embeddings=32,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
        ).to_dict(),
        vision_config=CLIPVisionConfig(
            hidden_size=shape.vision_hidden,
            intermediate_size=shape.vision_ffn,
            num_hidden_layers=shape.vision_layers,
            num_attention_heads=shape.heads,
            image_size=shape.image_size,
            patch_size=shape.patch_size,
        ).to_dict(),
        projection_dim=128,
    )
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(**_image_processor_kwargs(shape)), tokenizer=tokenizer
    )
    return CLIPModel(config), processor


BUILDERS = {"toy-llava": build_llava, "toy-instructblip": build_instructblip, "toy-clip": build_clip}


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
