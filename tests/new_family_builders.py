"""Tiny random checkpoints of the families added in issue 12, built from their configs (no downloads).

Each builder returns ``(model, processor)`` (a tokenizer for plain decoders): hidden size 32, two
layers, a two-layer vision tower over 16-32 pixel images and a word-level tokenizer over the scene
vocabulary plus the family's special tokens, so that ``save_pretrained`` of both gives a folder
that ``canprobe`` loads like a hub checkpoint. Chat templates keep each family's markers (the
role and image tokens) and drop the rest.
"""

from __future__ import annotations

import torch
import transformers as tf
from transformers import PreTrainedTokenizerFast

from canprobe.families.base import image_only_processor
from canprobe.organisms.build import PROMPT_WORDS, word_level_tokenizer
from canprobe.organisms.scenes import caption_words

BASE_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(len(BASE_TOKENS))
HIDDEN, FFN, HEADS = 32, 64, 2


def tokenizer(specials=(), attributes=None, bos=True, padding_side="left") -> PreTrainedTokenizerFast:
    """Word-level tokenizer: the base and the family's special tokens, then the scene and prompt words."""
    special = list(BASE_TOKENS) + [t for t in specials if t not in BASE_TOKENS]
    words = list(dict.fromkeys(caption_words() + PROMPT_WORDS))
    vocab = {t: i for i, t in enumerate(special + words)}
    return word_level_tokenizer(vocab, special, "<s> $A" if bos else None, padding_side, attributes, 512)


def _template(turn: str, image: str, end: str, generation: str, start: str = "") -> str:
    """A chat template: ``start``, then per message ``turn`` (with the role), its images, its text, ``end``."""
    return (
        start + "{% for message in messages %}" + turn + "{% for content in message['content'] | "
        "selectattr('type', 'equalto', 'image') %}{{ '" + image + "' }}{% endfor %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] }}{% endfor %}{{ '" + end + "' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '" + generation + "' }}{% endif %}"
    )


def _lm(tok, **extra) -> dict:
    return {
        "vocab_size": len(tok),
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": 2,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "max_position_embeddings": 512,
        **extra,
    }


SIGLIP = dict(
    model_type="siglip_vision_model",
    hidden_size=HIDDEN,
    intermediate_size=FFN,
    num_hidden_layers=2,
    num_attention_heads=HEADS,
    image_size=16,
    patch_size=8,
)


# --- plain decoders ---


def _decoder(config_class, **extra):
    tok = tokenizer()
    model = tf.AutoModelForCausalLM.from_config(config_class(**_lm(tok, **extra)))
    return model, tok


def build_qwen3():
    return _decoder(tf.Qwen3Config, head_dim=16)


def build_gemma2():
    return _decoder(tf.Gemma2Config, head_dim=16, sliding_window=8)


def build_gemma3_text():
    return _decoder(tf.Gemma3TextConfig, head_dim=16, sliding_window=8)


def build_phi3():
    return _decoder(tf.Phi3Config)


# --- LLaVA-OneVision: SigLIP, a two-layer projector, Qwen2; images tiled on a grid of pinpoints ---

ONEVISION_TEMPLATE = _template(
    "{{ '<|im_start|>' + message['role'] + ' ' }}", "<image> ", "<|im_end|> ", "<|im_start|>assistant "
)


def build_llava_onevision():
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tok = tokenizer(
        ["<image>", "<video>", "<|im_start|>", "<|im_end|>"],
        attributes={"image_token": "<image>", "video_token": "<video>"},
        bos=False,
    )
    pinpoints = [[16, 16], [16, 32], [32, 16], [32, 32]]
    config = tf.LlavaOnevisionConfig(
        vision_config=dict(SIGLIP, vision_use_head=False),
        text_config=dict(model_type="qwen2", **_lm(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    processor = image_only_processor(tf.LlavaOnevisionProcessor)(
        LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16}, image_grid_pinpoints=pinpoints),
        tok,
        num_image_tokens=4,
        vision_feature_select_strategy="full",
        chat_template=ONEVISION_TEMPLATE,
    )
    return tf.LlavaOnevisionForConditionalGeneration(config), processor


# --- Qwen2-VL, Qwen2.5-VL, Qwen3-VL: a ViT over flattened patches, a patch merger, M-RoPE decoder ---

QWEN_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>"]
QWEN_TEMPLATE = _template(
    "{{ '<|im_start|>' + message['role'] + ' ' }}",
    "<|vision_start|><|image_pad|><|vision_end|>",
    "<|im_end|> ",
    "<|im_start|>assistant ",
)
QWEN_VISION = dict(depth=2, num_heads=HEADS, patch_size=8, spatial_merge_size=2, temporal_patch_size=2)


def _qwen_vl(config_class, model_class, processor_class, vision: dict, **text):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = tokenizer(QWEN_TOKENS, attributes={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}, bos=False)
    ids = tok.convert_tokens_to_ids
    rope = {"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 10000.0}
    config = config_class(
        text_config=_lm(tok, rope_parameters=rope, **text),
        vision_config={**QWEN_VISION, **vision},
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    # every image is resized to 32 x 32 pixels: 4 x 4 patches, merged 2 x 2 into 4 image tokens
    pixels = 32 * 32
    images = Qwen2VLImageProcessorPil(
        size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=8, merge_size=2, temporal_patch_size=2
    )
    processor = image_only_processor(processor_class)(images, tok, chat_template=QWEN_TEMPLATE)
    return model_class(config), processor


def build_qwen2_vl():
    vision = dict(embed_dim=HIDDEN, hidden_size=HIDDEN, mlp_ratio=2)
    return _qwen_vl(tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLProcessor, vision)


def build_qwen2_5_vl():
    vision = dict(
        hidden_size=HIDDEN, intermediate_size=48, out_hidden_size=HIDDEN, window_size=16, fullatt_block_indexes=[1]
    )
    return _qwen_vl(tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLProcessor, vision)


def build_qwen3_vl():
    vision = dict(
        hidden_size=HIDDEN,
        intermediate_size=48,
        out_hidden_size=HIDDEN,
        num_position_embeddings=16,
        deepstack_visual_indexes=[0],
    )
    return _qwen_vl(tf.Qwen3VLConfig, tf.Qwen3VLForConditionalGeneration, tf.Qwen3VLProcessor, vision, head_dim=16)


# --- PaliGemma and Gemma 3: SigLIP and a Gemma decoder ---


def _gemma_text(tok, **extra) -> dict:
    return _lm(tok, head_dim=16, num_key_value_heads=1, **extra)


def build_paligemma(image_size: int = 16):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    # the processor writes BOS after the image tokens itself
    tok = tokenizer(["<image>"], attributes={"image_token": "<image>"}, bos=False)
    images = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    images.image_seq_length = (image_size // SIGLIP["patch_size"]) ** 2
    config = tf.PaliGemmaConfig(
        vision_config=dict(SIGLIP, image_size=image_size, projection_dim=HIDDEN),
        text_config=dict(model_type="gemma", **_gemma_text(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        projection_dim=HIDDEN,
        hidden_size=HIDDEN,
    )
    return tf.PaliGemmaForConditionalGeneration(config), tf.PaliGemmaProcessor(images, tok)


GEMMA3_TEMPLATE = _template(
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + ' ' }}",
    "<start_of_image>",
    "<end_of_turn> ",
    "<start_of_turn>model ",
    start="{{ bos_token }}",
)


# Gemma's image markers: the tokenizer attribute each is read from
GEMMA_IMAGE = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}


def build_gemma3(image_size: int = 16, tokens: int = 4):
    """``tokens`` image tokens per image: the projector average-pools the ViT's patches to a square grid of them."""
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = tokenizer([*GEMMA_IMAGE.values(), "<start_of_turn>", "<end_of_turn>"], attributes=GEMMA_IMAGE, bos=False)
    ids = tok.convert_tokens_to_ids
    config = tf.Gemma3Config(
        vision_config=dict(SIGLIP, image_size=image_size),
        text_config=_gemma_text(tok, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
        mm_tokens_per_image=tokens,
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
    )
    processor = tf.Gemma3Processor(
        Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}),
        tok,
        chat_template=GEMMA3_TEMPLATE,
        image_seq_length=tokens,
    )
    model = tf.Gemma3ForConditionalGeneration(config)
    # transformers initializes the projection to zeros (released weights replace it): images would reach nothing
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.2)
    return model, processor


# --- Idefics3 (and SmolVLM, whose checkpoints are idefics3): SigLIP-like ViT over image crops ---

IDEFICS3_TEMPLATE = _template(
    "{{ message['role'] | capitalize }}{{ ': ' }}", "<image>", "<end_of_utterance> ", "Assistant:", start="<|im_start|>"
)


def build_idefics3():
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    grid = [f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2)]
    tok = tokenizer(
        ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "<|im_start|>", *grid],
        attributes={"image_token": "<image>"},
    )
    config = tf.Idefics3Config(
        vision_config=dict(
            hidden_size=HIDDEN,
            intermediate_size=FFN,
            num_hidden_layers=2,
            num_attention_heads=HEADS,
            image_size=16,
            patch_size=4,
        ),
        text_config=dict(model_type="llama", **_lm(tok)),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,
    )
    # images up to 32 pixels are split into up to 2 x 2 crops of 16 pixels, plus the whole image
    images = Idefics3ImageProcessorPil(size={"longest_edge": 32}, max_image_size={"longest_edge": 16})
    processor = tf.Idefics3Processor(images, tok, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE)
    return tf.Idefics3ForConditionalGeneration(config), processor


# --- Mllama (Llama 3.2 Vision): a tiled ViT with a global encoder, cross-attention decoder layers ---

MLLAMA_TEMPLATE = _template(
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|> ' }}",
    "<|image|>",
    "<|eot_id|> ",
    "<|start_header_id|>assistant<|end_header_id|> ",
    start="{{ bos_token }}",
)


def build_mllama():
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tok = tokenizer(
        ["<|image|>", "<|python_tag|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        attributes={"image_token": "<|image|>"},
        bos=False,
    )
    config = tf.MllamaConfig(
        vision_config=dict(
            hidden_size=HIDDEN,
            intermediate_size=FFN,
            num_hidden_layers=2,
            num_global_layers=1,
            attention_heads=HEADS,
            image_size=16,
            patch_size=8,
            max_num_tiles=2,
            vision_output_dim=2 * HIDDEN,
            intermediate_layers_indices=[0],
            supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
        ),
        # layer 1 of 3 is a cross-attention layer
        text_config=_lm(tok, num_hidden_layers=3, cross_attention_layers=[1]),
        image_token_index=tok.convert_tokens_to_ids("<|image|>"),
    )
    images = MllamaImageProcessorPil(size={"height": 16, "width": 16}, max_image_tiles=2)
    model = tf.MllamaForConditionalGeneration(config)
    # the tanh gates of the cross-attention layers and of the global encoder start at zero, closing
    # them (released weights open them): the image would reach nothing
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("cross_attn_attn_gate", "cross_attn_mlp_gate", "gate_attn", "gate_ffn"):
                param.fill_(1.0)
    return model, tf.MllamaProcessor(images, tok, chat_template=MLLAMA_TEMPLATE)


# --- BLIP-2 and InstructBLIP with OPT or Flan-T5 language models ---

BLIP_VISION = dict(
    hidden_size=HIDDEN,
    intermediate_size=FFN,
    num_hidden_layers=2,
    num_attention_heads=HEADS,
    image_size=16,
    patch_size=8,
    initializer_range=0.02,
)


def _qformer(tok, layers: int = 1) -> dict:
    return dict(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        cross_attention_frequency=1,
        encoder_hidden_size=HIDDEN,
        max_position_embeddings=64,
        pad_token_id=PAD_ID,
    )


def _opt(tok) -> dict:
    return dict(
        model_type="opt",
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        ffn_dim=FFN,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        word_embed_proj_dim=HIDDEN,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        max_position_embeddings=128,
    )


def _t5(tok, feed_forward: str) -> dict:
    return dict(
        model_type="t5",
        vocab_size=len(tok),
        d_model=HIDDEN,
        d_kv=16,
        d_ff=FFN,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=HEADS,
        feed_forward_proj=feed_forward,
        decoder_start_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )


def _blip_images():
    return tf.BlipImageProcessorPil(size={"height": 16, "width": 16})


def _blip2(text: str):
    tok = tokenizer(["<image>"], bos=text == "opt")
    text_config = _opt(tok) if text == "opt" else _t5(tok, text)
    config = tf.Blip2Config(
        vision_config=BLIP_VISION,
        qformer_config=_qformer(tok),
        text_config=text_config,
        num_query_tokens=4,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    processor = tf.Blip2Processor(_blip_images(), tok, num_query_tokens=4)
    return tf.Blip2ForConditionalGeneration(config), processor


def build_blip2_opt():
    return _blip2("opt")


def build_blip2_flan_t5():
    return _blip2("gated-gelu")


def build_blip2_t5():
    return _blip2("relu")


def build_instructblip_flan_t5():
    tok = tokenizer(["<image>"], bos=False)
    qformer_tok = tokenizer(padding_side="right")
    config = tf.InstructBlipConfig(
        vision_config=BLIP_VISION,
        # two Q-Former layers: the text branch of the last one never reaches the loss
        qformer_config=_qformer(qformer_tok, layers=2),
        text_config=_t5(tok, "gated-gelu"),
        num_query_tokens=4,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    processor = tf.InstructBlipProcessor(_blip_images(), tok, qformer_tok, num_query_tokens=4)
    return tf.InstructBlipForConditionalGeneration(config), processor
