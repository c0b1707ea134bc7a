"""Prompt formats per architecture: what each model family expects around the user's text."""

from __future__ import annotations

LLAVA_FALLBACK_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"

DEFAULT_PROMPTS = {
    "llava": "Describe the image briefly.",
    "instructblip": "Write a short caption for this image.",
    "decoder": "Describe the image briefly.",
}


def build_prompts(processor, kind: str, prompts: list[str]) -> list[str]:
    """Wrap each prompt the way the model was trained to see it.

    LLaVA: the processor's chat template with one image (llava-hf checkpoints ship one); the
    1.5 format ``USER: <image>\\n... ASSISTANT:`` when a processor has none. InstructBLIP and plain
    decoder LMs take the instruction as it is (InstructBLIP's processor adds the query tokens).
    """
    if kind != "llava":
        return list(prompts)
    if getattr(processor, "chat_template", None):
        return [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
                add_generation_prompt=True,
            )
            for p in prompts
        ]
    return [LLAVA_FALLBACK_TEMPLATE.format(prompt=p) for p in prompts]
