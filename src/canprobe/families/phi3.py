"""Phi-3 (``phi3``): a decoder whose MLP computes the gate and up projections in one linear,
``down_proj(up * act(gate))`` with ``gate, up = gate_up_proj(x).chunk(2)``; its sites are found from
its structure (``structure.FUSED``): a gate unit is the activation's output (its weights: the first
half of ``gate_up_proj``'s rows), an up unit the second half of ``gate_up_proj``'s output.
"""

from __future__ import annotations

from canprobe.families.decoder import Decoder


class Phi3(Decoder):
    name = "phi3"
    model_types = ("phi3",)
