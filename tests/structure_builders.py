"""Tiny random checkpoints of families canprobe reads from their structure (no adapter), built from configs.

Same conventions as ``new_family_builders``: each builder returns ``(model, processor)``, hidden size
32, two layers, 16-32 pixel images, a word-level tokenizer over the scene vocabulary plus the
family's special tokens, and a chat template that keeps the family's markers. The mixture-of-experts
models have 4 experts, 2 routed per token.
"""

from __future__ import annotations

import transformers as tf

from canprobe.families.base import image_only_processor
from tests.new_family_builders import (
    GEMMA_IMAGE,
    HEADS,
    HIDDEN,
    QWEN_TEMPLATE,
    QWEN_TOKENS,
    SIGLIP,
    _lm,
    _qwen_vl,
    _template,
    tokenizer,
)

CHAT = _template("{{ '<|user|> ' if message['role'] == 'user' else '' }}", "<image> ", " ", "<|assistant|> ")
CHAT_TOKENS = ["<|user|>", "<|assistant|>"]
VIT = dict(hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2, num_attention_heads=HEADS)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)


# --- LLaVA-style: a CLIP or SigLIP tower, a two-layer projector ---


def build_vipllava():
    tok = tokenizer(["<image>", *CHAT_TOKENS], attributes={"image_token": "<image>"})
    config = tf.VipLlavaConfig(
        vision_config=dict(VIT, model_type="clip_vision_model", image_size=16, patch_size=8),
        text_config=dict(model_type="llama", **_lm(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layers=[-1, -2],
        image_seq_length=4,
    )
    images = tf.CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = tf.LlavaProcessor(
        images,
        tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT,
    )
    return tf.VipLlavaForConditionalGeneration(config), processor


def build_aya_vision():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    specials = ["<image>", "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>"]
    tok = tokenizer([*specials, "TILE", "TILE_GLOBAL", *CHAT_TOKENS], attributes={"image_token": "<image>"})
    config = tf.AyaVisionConfig(
        vision_config=dict(SIGLIP, patch_size=4),
        text_config=dict(model_type="cohere2", **_lm(tok, head_dim=16, layer_types=["full_attention"] * 2)),
        image_token_index=tok.convert_tokens_to_ids("<|IMG_PATCH|>"),
        downsample_factor=2,
    )
    images = GotOcr2ImageProcessorPil(size={"height": 16, "width": 16}, crop_to_patches=False)
    processor = tf.AyaVisionProcessor(images, tok, patch_size=4, img_size=16, downsample_factor=2, chat_template=CHAT)
    return tf.AyaVisionForConditionalGeneration(config), processor


def build_mistral3():
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    tok = tokenizer(["[IMG]", "[IMG_BREAK]", "[IMG_END]", *CHAT_TOKENS], attributes={"image_token": "[IMG]"})
    config = tf.Mistral3Config(
        vision_config=dict(VIT, model_type="pixtral", head_dim=16, image_size=16, patch_size=4),
        text_config=dict(model_type="mistral", **_lm(tok, head_dim=16)),
        image_token_index=tok.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )
    images = PixtralImageProcessorPil(size={"longest_edge": 16}, patch_size=4)
    processor = tf.PixtralProcessor(
        images, tok, patch_size=4, spatial_merge_size=2, chat_template=CHAT.replace("<image> ", "[IMG] ")
    )
    return tf.Mistral3ForConditionalGeneration(config), processor


# --- Idefics2: SigLIP-like ViT, a perceiver resampler; SmolVLM (v2): pixel shuffle ---


def build_idefics2():
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    tok = tokenizer(["<image>", "<fake_token_around_image>", "<end_of_utterance>", *CHAT_TOKENS])
    config = tf.Idefics2Config(
        vision_config=dict(VIT, image_size=16, patch_size=4),
        perceiver_config=dict(
            hidden_size=HIDDEN,
            resampler_n_latents=4,
            resampler_depth=1,
            resampler_n_heads=HEADS,
            resampler_head_dim=16,
            num_key_value_heads=1,
        ),
        text_config=dict(model_type="mistral", **_lm(tok)),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    images = Idefics2ImageProcessorPil(size={"longest_edge": 16, "shortest_edge": 16}, do_image_splitting=False)
    processor = tf.Idefics2Processor(images, tok, image_seq_len=4, chat_template=CHAT)
    return tf.Idefics2ForConditionalGeneration(config), processor


def build_smolvlm():
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    grid = [f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2)]
    tok = tokenizer(
        ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>", *CHAT_TOKENS, *grid],
        attributes={"image_token": "<image>"},
    )
    tok.fake_image_token, tok.global_image_token = "<fake_token_around_image>", "<global-img>"
    config = tf.SmolVLMConfig(
        vision_config=dict(VIT, image_size=16, patch_size=4),
        text_config=dict(model_type="llama", **_lm(tok)),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,
    )
    images = SmolVLMImageProcessorPil(
        size={"longest_edge": 16}, max_image_size={"longest_edge": 16}, do_image_splitting=False
    )
    processor = image_only_processor(tf.SmolVLMProcessor)(images, tok, image_seq_len=4, chat_template=CHAT)
    return tf.SmolVLMForConditionalGeneration(config), processor


# --- InternVL: InternViT, pixel shuffle, a two-layer projector, Qwen2 ---


def build_internvl():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tok = tokenizer(
        ["<img>", "</img>", "<IMG_CONTEXT>", "<video>", *CHAT_TOKENS],
        attributes={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    for name in ("start_image_token", "end_image_token", "context_image_token"):
        setattr(tok, f"{name}_id", tok.convert_tokens_to_ids(getattr(tok, name)))
    config = tf.InternVLConfig(
        vision_config=dict(
            **VIT,
            image_size=[16, 16],
            patch_size=[4, 4],
        ),
        text_config=dict(model_type="qwen2", **_lm(tok)),
        image_token_id=tok.context_image_token_id,
        image_seq_length=4,
        downsample_ratio=0.5,
    )
    images = GotOcr2ImageProcessorPil(size={"height": 16, "width": 16}, crop_to_patches=False)
    template = CHAT.replace("<image> ", "<IMG_CONTEXT> ")
    processor = image_only_processor(tf.InternVLProcessor)(images, tok, image_seq_length=4, chat_template=template)
    return tf.InternVLForConditionalGeneration(config), processor


# --- Qwen3.5 (gated delta-net and attention layers), Qwen3-VL-MoE, Qwen3.5-MoE (shared expert), GLM-4.1V ---

LINEAR_ATTENTION = dict(
    head_dim=16,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_num_key_heads=2,
    linear_num_value_heads=2,
    layer_types=["linear_attention", "full_attention"],
)
QWEN3_VISION = dict(hidden_size=HIDDEN, intermediate_size=48, out_hidden_size=HIDDEN, num_position_embeddings=16)


def build_qwen3_5():
    return _qwen_vl(
        tf.Qwen3_5Config, tf.Qwen3_5ForConditionalGeneration, tf.Qwen3VLProcessor, QWEN3_VISION, **LINEAR_ATTENTION
    )


def build_qwen3_vl_moe():
    vision = dict(QWEN3_VISION, deepstack_visual_indexes=[0])
    return _qwen_vl(
        tf.Qwen3VLMoeConfig, tf.Qwen3VLMoeForConditionalGeneration, tf.Qwen3VLProcessor, vision, head_dim=16, **MOE
    )


def build_qwen3_5_moe():
    return _qwen_vl(
        tf.Qwen3_5MoeConfig,
        tf.Qwen3_5MoeForConditionalGeneration,
        tf.Qwen3VLProcessor,
        QWEN3_VISION,
        shared_expert_intermediate_size=24,
        **MOE,
        **LINEAR_ATTENTION,
    )


GLM_TOKENS = [
    "<|image|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|video|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
]


def _glm4v(config_class, model_class, processor_class=tf.Glm4vProcessor, **text):
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    tok = tokenizer([*GLM_TOKENS, *CHAT_TOKENS], attributes={"image_token": "<|image|>", "video_token": "<|video|>"})
    ids = tok.convert_tokens_to_ids
    rope = {"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e4, "partial_rotary_factor": 0.5}
    config = config_class(
        text_config=_lm(tok, rope_parameters=rope, **text),
        vision_config=dict(
            depth=2,
            hidden_size=HIDDEN,
            intermediate_size=48,
            num_heads=HEADS,
            image_size=32,
            patch_size=8,
            out_hidden_size=HIDDEN,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids("<|image|>"),
        video_token_id=ids("<|video|>"),
        image_start_token_id=ids("<|begin_of_image|>"),
        image_end_token_id=ids("<|end_of_image|>"),
        video_start_token_id=ids("<|begin_of_video|>"),
        video_end_token_id=ids("<|end_of_video|>"),
    )
    pixels = 32 * 32
    images = Glm4vImageProcessorPil(
        size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=8, merge_size=2, temporal_patch_size=2
    )
    template = CHAT.replace("<image> ", "<|begin_of_image|><|image|><|end_of_image|> ")
    processor = image_only_processor(processor_class)(images, tok, chat_template=template)
    return model_class(config), processor


def build_glm4v():
    """GLM-4.1V: a fused gate_up_proj in every decoder layer."""
    return _glm4v(tf.Glm4vConfig, tf.Glm4vForConditionalGeneration)


def build_glm46v():
    """GLM-4.6V: GLM-4.1V's layout under its own type and processor."""
    return _glm4v(tf.Glm46VConfig, tf.Glm46VForConditionalGeneration, tf.Glm46VProcessor)


def build_glm4v_moe():
    """GLM-4.5V: a dense first layer, then experts (fused 3-D weights) with a shared expert."""
    experts = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1)
    return _glm4v(
        tf.Glm4vMoeConfig, tf.Glm4vMoeForConditionalGeneration, first_k_dense_replace=1, head_dim=16, **experts
    )


# --- PaddleOCR-VL: a NaViT-style SigLIP over flattened patches, an Ernie-4.5 decoder ---


def build_paddleocr_vl():
    from transformers.models.paddleocr_vl.image_processing_pil_paddleocr_vl import PaddleOCRVLImageProcessorPil

    tok = tokenizer(QWEN_TOKENS, attributes={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}, bos=False)
    tok.image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
    ids = tok.convert_tokens_to_ids
    rope = {"rope_type": "default", "mrope_section": [4, 2, 2], "rope_theta": 1e4}
    config = tf.PaddleOCRVLConfig(
        text_config=_lm(tok, head_dim=16, rope_parameters=rope),
        vision_config=dict(
            **VIT,
            image_size=32,
            patch_size=8,
            spatial_merge_size=2,
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    images = PaddleOCRVLImageProcessorPil(min_pixels=32 * 32, max_pixels=32 * 32, patch_size=8, merge_size=2)
    processor = tf.PaddleOCRVLProcessor(images, tok, chat_template=QWEN_TEMPLATE)
    return tf.PaddleOCRVLForConditionalGeneration(config), processor


# --- Gemma 4: a ViT with pooled soft tokens, a Gemma decoder with per-layer inputs ---


def build_gemma4():
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    # the processor insists on audio markers even for images
    audio = {"audio_token": "<audio>", "boa_token": "<start_of_audio>", "eoa_token": "<end_of_audio>"}
    markers = {**GEMMA_IMAGE, **audio}
    tok = tokenizer([*markers.values(), "<|video|>", "<start_of_turn>", "<end_of_turn>"], attributes=markers, bos=False)
    ids = tok.convert_tokens_to_ids
    tok.image_token_id, tok.audio_token_id = ids("<image_soft_token>"), ids("<audio>")
    config = tf.Gemma4Config(
        text_config=_lm(
            tok,
            head_dim=16,
            num_key_value_heads=1,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=len(tok),
        ),
        vision_config=dict(
            **VIT,
            num_key_value_heads=HEADS,
            head_dim=16,
            patch_size=4,
            pooling_kernel_size=3,
            position_embedding_size=64,
        ),
        audio_config=None,
        boi_token_id=ids("<start_of_image>"),
        eoi_token_id=ids("<end_of_image>"),
        image_token_id=ids("<image_soft_token>"),
        video_token_id=ids("<|video|>"),
    )
    images = Gemma4ImageProcessorPil(patch_size=4, max_soft_tokens=70, pooling_kernel_size=3)
    template = _template(
        "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + ' ' }}",
        "<image_soft_token>",
        "<end_of_turn> ",
        "<start_of_turn>model ",
    )
    processor = image_only_processor(tf.Gemma4Processor)(
        images, tok, feature_extractor=tf.Gemma4AudioFeatureExtractor(), chat_template=template, image_seq_length=70
    )
    return tf.Gemma4ForConditionalGeneration(config), processor
