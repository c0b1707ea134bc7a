"""Image features computed once per image and reused under every mask that cannot change them.

A mask on the language model leaves the vision tower, the projector and the Q-Former untouched, so
the features they hand to the language model are the same for every such mask. Scoring and search
over language scopes encode each image once and feed the cached features to every masked caption
and every loss pass, each family its own way (``Family.encode_images``, ``feature_inputs``,
``generate_from_features``). A mask on a site outside the language model changes the features:
``reusable`` says no. Whether the installed transformers can take pre-encoded images at all is
asked once per model (``Family.cached_features``); where it cannot, every pass encodes the pixels,
with one log line.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
from PIL import Image

from canprobe.config import Generation
from canprobe.inputs import caption_inputs
from canprobe.models import LoadedModel

log = logging.getLogger(__name__)

_SUPPORT = "_canprobe_cached_features"  # the answer of Family.cached_features, kept on the model


def supported(lm: LoadedModel) -> bool:
    """Whether this model, on the installed transformers, can be fed cached image features (asked once)."""
    answer = getattr(lm.model, _SUPPORT, None)
    if answer is None:
        answer = bool(lm.family.takes_images and lm.family.cached_features(lm.model))
        if lm.family.takes_images and not answer:
            import transformers

            log.info(
                "%s on transformers %s takes no pre-encoded image features: images are encoded on every pass",
                lm.source,
                transformers.__version__,
            )
        setattr(lm.model, _SUPPORT, answer)
    return answer


def reusable(lm: LoadedModel, site_names: Iterable[str]) -> bool:
    """Whether cached image features stay valid under masks of these sites (language sites only)."""
    return supported(lm) and all(name.split(".", 1)[0] == "language" for name in site_names)


def encode(lm: LoadedModel, enc: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per image of a processor batch, what the language model receives in place of its image tokens."""
    return lm.family.encode_images(lm.model, enc)


def _rows(lm: LoadedModel, enc: dict, features: Sequence[torch.Tensor]) -> tuple[dict, tuple[torch.Tensor, ...]]:
    text = {k: v for k, v in enc.items() if k not in lm.family.encoder_inputs}
    param = next(lm.model.parameters())
    # from pinned memory (``FeatureCache``) the copies run behind the host, not one wait per row
    return text, tuple(f.to(param.device, param.dtype, non_blocking=True) for f in features)


def model_inputs(lm: LoadedModel, enc: dict[str, torch.Tensor], features: Sequence[torch.Tensor]) -> dict:
    """Model-call inputs for a batch whose rows use ``features`` (one entry per row) instead of pixels."""
    return lm.family.feature_inputs(lm.model, *_rows(lm, enc, features))


@torch.no_grad()
def generate(lm: LoadedModel, enc: dict[str, torch.Tensor], features: Sequence[torch.Tensor], **kwargs):
    """``generate`` from cached features: the same tokens as the model's own generate on the pixels."""
    return lm.family.generate_from_features(lm.model, *_rows(lm, enc, features), **kwargs)


def _host(feature: torch.Tensor) -> torch.Tensor:
    """A GPU encoding kept in pinned host memory, so each pass copies it back to the GPU asynchronously."""
    if feature.device.type != "cuda":
        return feature.cpu()
    pinned = torch.empty(feature.shape, dtype=feature.dtype, pin_memory=True)
    return pinned.copy_(feature)


class FeatureCache:
    """Features of a fixed image list under the prompt of ``generation``, encoded in batches of its
    ``batch_size`` the first time they are asked for."""

    def __init__(self, lm: LoadedModel, images: Sequence[Image.Image], generation: Generation):
        self.lm, self.images, self.generation = lm, list(images), generation
        self._features: list[torch.Tensor] | None = None
        self.encoded = 0  # images run through the encoder (a benchmark and test counter)

    def rows(self, image_ids: Sequence[int]) -> list[torch.Tensor]:
        if self._features is None:
            feats: list[torch.Tensor] = []
            size = self.generation.batch_size
            for start in range(0, len(self.images), size):
                batch = self.images[start : start + size]
                feats += [_host(f) for f in encode(self.lm, caption_inputs(self.lm, batch, self.generation.prompt))]
                self.encoded += len(batch)
            self._features = feats
        return [self._features[i] for i in image_ids]
