"""Phi-3 (``phi3``): a decoder whose MLP computes the gate and up projections in one linear,
``down_proj(up * act(gate))`` with ``gate, up = gate_up_proj(x).chunk(2)``.

A gate unit is the activation's output (its weights: the first half of ``gate_up_proj``'s rows), an
up unit the second half of ``gate_up_proj``'s output; the sites read and mask exactly that half.
"""

from __future__ import annotations

from canprobe.families.base import SiteKind
from canprobe.families.decoder import Decoder

FUSED_SWIGLU = {
    "gate_proj": SiteKind("mlp.activation_fn", "output", "mlp.gate_up_proj", "out", part=0, parts=2),
    "up_proj": SiteKind("mlp.gate_up_proj", "output", "mlp.gate_up_proj", "out", part=1, parts=2),
    "down_proj": SiteKind("mlp.down_proj", "output", "mlp.down_proj", "out"),
    "down_proj.input": SiteKind("mlp.down_proj", "input", "mlp.down_proj", "in"),
}


class Phi3(Decoder):
    name = "phi3"
    model_types = ("phi3",)
    site_kinds = {"language": FUSED_SWIGLU}
