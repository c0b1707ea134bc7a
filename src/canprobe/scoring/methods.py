"""Score methods: one small class per method over the shared engine (``canprobe.scoring.engine``).

A method says what the engine sums per position and neuron (``forward_value`` from the activation,
or ``backward_value`` from the activation and its gradient) and how the sums become a score
(``finish``). Every method shares the engine's call shape and its ``signed`` estimate.

- ``CAN(alpha)``: mean over positions of |dL/da|^alpha * |a| (alpha 0: from the forward pass alone);
- ``Activation``: CAN with alpha 0, the activation magnitude;
- ``Gradient``: mean |dL/da|;
- ``Random``: seeded uniform scores, site after site in model order;
- ``Wanda``: sum over the neuron's weight row (or column, for input-unit sites) of |W| times the
  RMS of the matching input feature over the same positions (Wanda's L2 norm divided by
  sqrt(count), so it does not grow with the data set).
"""

from __future__ import annotations

import torch

from canprobe.config import SCORE_METHODS
from canprobe.errors import InputError
from canprobe.sites import SiteRegistry


def _checked_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise InputError(f"alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


class Method:
    """The default: nothing summed per position; ``finish`` turns a site's sums into its scores."""

    name = ""
    reads_weight_inputs = False  # whether the engine must hook the input of each site's linear layer

    def forward_value(self, a: torch.Tensor) -> torch.Tensor | None:
        """Per position and neuron (float32), from the activation [rows, T, N] in the model's dtype; None:
        nothing (then the engine makes no float32 copy of the activation in the forward pass)."""
        return None

    def backward_value(self, a: torch.Tensor, g: torch.Tensor, prod: torch.Tensor) -> torch.Tensor | None:
        """Per position and neuron, from the activation, its gradient and their product (which it may reuse)."""
        return None

    def finish(self, accs, n: int, registry: SiteRegistry) -> dict[str, torch.Tensor]:
        """Site name -> scores, from the engine's accumulators over ``n`` samples."""
        return {acc.site.name: acc.mean(n) for acc in accs}

    def config(self) -> dict:
        return {"method": self.name, "alpha": None}


class CAN(Method):
    name = "can"

    def __init__(self, alpha: float = 1.0):
        self.alpha = _checked_alpha(alpha)

    def forward_value(self, a):
        return a.float().abs() if self.alpha == 0 else None

    def backward_value(self, a, g, prod):
        if self.alpha == 0:
            return None
        return prod.abs_() if self.alpha == 1 else g.abs().pow_(self.alpha).mul_(a.abs())

    def config(self) -> dict:
        return {"method": self.name, "alpha": self.alpha}


class Activation(CAN):
    name = "activation"

    def __init__(self):
        super().__init__(0.0)


class Gradient(Method):
    name = "gradient"

    def backward_value(self, a, g, prod):
        return g.abs()


class Random(Method):
    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def finish(self, accs, n, registry):
        gen = torch.Generator().manual_seed(self.seed)
        return {acc.site.name: torch.rand(acc.site.size, generator=gen) for acc in accs}


class Wanda(Method):
    name = "wanda"
    reads_weight_inputs = True

    def finish(self, accs, n, registry):
        scores = {}
        for acc in accs:
            norm = (acc.input_sq / n).sqrt()
            weight = registry.weights(acc.site).detach().float().abs().cpu()
            scores[acc.site.name] = weight @ norm if acc.site.weight_axis == "out" else weight.sum(dim=0) * norm
        return scores


_CLASSES = {cls.name: cls for cls in (CAN, Activation, Gradient, Random, Wanda)}
METHODS = {name: _CLASSES[name] for name in SCORE_METHODS}  # the choice list's order; a name with no class fails here


def make_method(method: str, alpha: float = 1.0, seed: int = 0) -> Method:
    """The method called ``method``; ``alpha`` applies to CAN, ``seed`` to Random."""
    if method not in METHODS:
        raise InputError(f"unknown score method {method!r}; choose from {', '.join(SCORE_METHODS)}")
    alpha = _checked_alpha(alpha)  # checked whatever the method, as the command line and configs do
    if method == "can":
        return CAN(alpha)
    return Random(seed) if method == "random" else METHODS[method]()
