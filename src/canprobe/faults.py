"""What happens to a masked neuron (a fault model), and protections that limit the damage.

A fault is one small class. Activation faults implement ``apply(x, mask, state)``: given a site's
activation tensor ``x`` (features last) and a boolean ``mask`` over its neurons (shape ``(size,)``
for one shared mask, or ``(rows, 1, ..., size)`` for per-row masks), return the faulted ``x``;
``state`` is what ``prepare`` computed once per site (constants on the model's device). ``needs``
names the clean-image statistics (``ChannelStats`` fields) the fault reads. Weight faults
(``WeightBitFlip``) act on the linear layer that holds the neuron's weights instead.

Faults are applied through ``canprobe.ablation.Ablation`` (``ablate``, ``ablate_rows``): the same
``with`` block, per-row masks, prompt and generation, and an exact restore on exit. Spec strings
name a fault and its parameters, e.g. ``zero``, ``mean:by=position``, ``stuck:at=max:factor=2``, ``noise:sigma=3``,
``bitflip:bit=exponent``, ``weight_bitflip:bit=exponent:weights=all``.

Protections: ``RangeRestriction`` clamps every channel of the protected sites to bounds calibrated
on clean images (Ranger); ``ProtectedSet`` names neurons that faults cannot touch (ECC, duplication).
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from canprobe.errors import InputError

if TYPE_CHECKING:  # only for annotations: faults stay importable by the configuration, below the model code
    from canprobe.sites import Site

# floating dtype -> (integer dtype of the same width, named bits)
BIT_LAYOUTS: dict[torch.dtype, tuple[torch.dtype, dict[str, int]]] = {
    torch.bfloat16: (torch.int16, {"sign": 15, "exponent": 14, "mantissa": 6}),
    torch.float16: (torch.int16, {"sign": 15, "exponent": 14, "mantissa": 9}),
    torch.float32: (torch.int32, {"sign": 31, "exponent": 30, "mantissa": 22}),
}
BIT_NAMES = ("sign", "exponent", "mantissa")
SEED_MAX = 2**63 - 1  # seeds are int64 everywhere (torch generators, numpy, the run identity)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # the dtypes a model runs in


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel statistics of one site on clean images (float32, one value per neuron).

    ``position_mean`` [positions, neurons]: the mean at each token position, numbered as the model
    numbers them (``activation_stats(by_position=True)``); None when not measured.
    """

    mean: torch.Tensor
    std: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor
    position_mean: torch.Tensor | None = None


def resolve_bit(bit: int | str, dtype: torch.dtype) -> int:
    """A bit position (0 = least significant) or a name (sign, exponent = its top bit, mantissa = its top bit)."""
    if dtype not in BIT_LAYOUTS:
        raise InputError(f"bit flips need a float32, float16 or bfloat16 model, not {dtype}")
    int_dtype, names = BIT_LAYOUTS[dtype]
    width = torch.iinfo(int_dtype).bits
    if isinstance(bit, str):
        if bit not in names:
            raise InputError(f"unknown bit {bit!r}; give a position 0-{width - 1} or one of {', '.join(names)}")
        return names[bit]
    if not isinstance(bit, int) or isinstance(bit, bool):
        raise InputError(
            f"bit {bit!r} is not a bit position; give a whole number 0-{width - 1} or one of {', '.join(names)}"
        )
    if not 0 <= bit < width:
        raise InputError(
            f"bit {bit} is out of range for {str(dtype).removeprefix('torch.')}: it has bits 0-{width - 1}"
        )
    return bit


def _bit(bit: int | str) -> int | str:
    """A bit as a fault's constructor takes it: a position (checked against the dtype later) or a name."""
    if isinstance(bit, bool) or not isinstance(bit, (int, str)) or (isinstance(bit, str) and bit not in BIT_NAMES):
        raise InputError(
            f"bit {bit!r} is not a bit; give a whole number (0 = least significant) or one of {', '.join(BIT_NAMES)}"
        )
    return bit


def flip_bit(x: torch.Tensor, bit: int) -> torch.Tensor:
    """``x`` with one bit of every element flipped, through an integer view of its own dtype."""
    int_dtype, _ = BIT_LAYOUTS[x.dtype]
    width = torch.iinfo(int_dtype).bits
    value = 1 << bit if bit < width - 1 else -(1 << bit)  # the sign bit of a signed integer
    return (x.contiguous().view(int_dtype) ^ value).view(x.dtype)


class Fault:
    """An activation fault: subclasses set ``name`` and implement ``apply`` (and ``prepare`` if they need state)."""

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()
    acts_on: ClassVar[str] = "activation"
    compiles: ClassVar[bool] = True  # the same values inside a compiled decoding step

    def spec(self) -> str:
        """The spec string that makes this fault again."""
        params = ":".join(f"{k}={v}" for k, v in vars(self).items() if v is not None)
        return f"{self.name}:{params}" if params else self.name

    def check(self, dtype: torch.dtype) -> None:
        """Raise InputError when the fault cannot act on a model of this dtype."""

    def prepare(self, site: Site, stats: ChannelStats | None, device: torch.device, dtype: torch.dtype):
        """Per-site constants for ``apply`` (the statistics named in ``needs`` are present)."""
        return None

    def apply(self, x: torch.Tensor, mask: torch.Tensor, state) -> torch.Tensor:
        raise NotImplementedError

    def start(self, device: torch.device) -> None:
        """Called on entering the ``with`` block (e.g. to reseed random faults)."""


class Zero(Fault):
    name = "zero"

    def apply(self, x, mask, state):
        return torch.where(mask, 0.0, x)


MEAN_BY = ("all", "position")


class PositionMeans:
    """One site's mean per token position, and the positions of the tokens passing now.

    ``positions(x)`` gives the position of every row of ``x`` (the ablation that hooks the site sets
    it); positions past the calibrated ones (a longer generation) get the all-position mean, the
    table's last row.
    """

    def __init__(self, table: torch.Tensor):
        self.table = table
        self.positions: Callable[[torch.Tensor], torch.Tensor] | None = None

    def at(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[self.positions(x).clamp(0, self.table.shape[0] - 1)]


class Mean(Fault):
    """The channel's mean activation on clean images: over all positions (``by=all``), or at the
    token's own position (``by=position``), Sun et al.'s control for massive activations, which sit
    on fixed positions such as the first token, far from their channel's all-position mean."""

    name = "mean"

    def __init__(self, by: str = "all"):
        if by not in MEAN_BY:
            raise InputError(f"mean: by must be one of {', '.join(MEAN_BY)}, got {by!r}")
        self.by = None if by == "all" else by

    @property
    def needs(self) -> tuple[str, ...]:
        return ("mean",) if self.by is None else ("mean", "position_mean")

    def prepare(self, site, stats, device, dtype):
        mean = stats.mean.to(device=device, dtype=dtype)
        if self.by is None:
            return mean
        return PositionMeans(torch.cat([stats.position_mean.to(device=device, dtype=dtype), mean[None]]))

    def apply(self, x, mask, state):
        return torch.where(mask, state if self.by is None else state.at(x), x)


class StuckAt(Fault):
    """A constant ``value``, or ``factor`` times the channel's clean maximum (``at=max``) or minimum (``at=min``)."""

    name = "stuck"

    def __init__(self, value: float | None = None, at: str | None = None, factor: float = 1.0):
        if (value is None) == (at is None):
            raise InputError("stuck-at needs either value=<number> or at=max|min (with factor=<number>)")
        if at is not None and at not in ("max", "min"):
            raise InputError(f"stuck-at: at must be max or min, got {at!r}")
        for label, v in (("value", value), ("factor", factor)):
            if v is not None and not math.isfinite(v):
                raise InputError(f"stuck-at {label} must be a finite number, got {v}")
        self.value, self.at, self.factor = value, at, None if at is None else factor

    def check(self, dtype):
        """The value (or factor) must stay finite in the model's dtype: 1e39 is inf in float32, 7e4 in float16."""
        for label, v in (("value", self.value), ("factor", self.factor)):
            if v is not None and dtype.is_floating_point and not torch.tensor(float(v)).to(dtype).isfinite():
                name = str(dtype).removeprefix("torch.")
                raise InputError(
                    f"stuck-at {label} {v:g} is infinite in {name} (its largest finite value is "
                    f"{torch.finfo(dtype).max:.4g}); give a smaller {label} or another --dtype"
                )

    @property
    def needs(self) -> tuple[str, ...]:
        return () if self.at is None else (self.at,)

    def prepare(self, site, stats, device, dtype):
        if self.at is None:
            return torch.tensor(self.value, device=device, dtype=dtype)
        return (getattr(stats, self.at) * self.factor).to(device=device, dtype=dtype)

    def apply(self, x, mask, state):
        return torch.where(mask, state, x)


class SignFlip(Fault):
    name = "sign"

    def apply(self, x, mask, state):
        return torch.where(mask, -x, x)


class Noise(Fault):
    """Additive Gaussian noise of ``sigma`` times the channel's clean std; a new draw every forward.

    A generator seeded with ``seed`` on entering the block makes a run reproducible (same batches,
    same draws).
    """

    name = "noise"
    needs = ("std",)
    compiles = False  # a compiled step would not draw from the seeded generator in the same order

    def __init__(self, sigma: float = 1.0, seed: int = 0):
        if not (math.isfinite(sigma) and sigma >= 0):
            raise InputError(f"noise sigma must be a finite number >= 0, got {sigma}")
        if not 0 <= seed <= SEED_MAX:
            raise InputError(f"noise seed must be a whole number in [0, 2^63 - 1], got {seed}")
        self.sigma, self.seed = sigma, int(seed)
        self._generator: torch.Generator | None = None

    def spec(self) -> str:
        return f"{self.name}:sigma={self.sigma}:seed={self.seed}"

    def start(self, device):
        self._generator = torch.Generator(device=device).manual_seed(self.seed)

    def prepare(self, site, stats, device, dtype):
        return (stats.std * self.sigma).to(device=device, dtype=dtype)

    def apply(self, x, mask, state):
        noise = torch.randn(x.shape, generator=self._generator, device=x.device, dtype=x.dtype)
        return torch.where(mask, x + noise * state, x)


class BitFlip(Fault):
    """Flip one bit of the activation in the model's own dtype (default: the exponent's top bit)."""

    name = "bitflip"

    def __init__(self, bit: int | str = "exponent"):
        self.bit = _bit(bit)

    def check(self, dtype):
        resolve_bit(self.bit, dtype)

    def prepare(self, site, stats, device, dtype):
        return resolve_bit(self.bit, dtype)

    def apply(self, x, mask, state):
        return torch.where(mask, flip_bit(x, state), x)


class WeightBitFlip(Fault):
    """Flip one bit of the neuron's weights: its row of the linear that writes it (output readings such as
    ``down_proj``, ``gate_proj``) or its column of the linear that reads it (``down_proj.input``).

    ``weights=largest`` flips the bit in the weight of largest magnitude only (one flipped bit per
    neuron, as a bit-flip attack would); ``weights=all`` in every weight of the row or column. With
    one mask for all rows the weights are flipped in place and copied back bit-exactly on exit;
    with per-row masks they stay untouched and each row group runs the linear with its own flipped copy.
    """

    name = "weight_bitflip"
    acts_on = "weight"

    def __init__(self, bit: int | str = "exponent", weights: str = "largest"):
        if weights not in ("largest", "all"):
            raise InputError(f"weight_bitflip: weights must be largest or all, got {weights!r}")
        self.bit, self.weights = _bit(bit), weights

    def check(self, dtype):
        resolve_bit(self.bit, dtype)

    def positions(self, weight: torch.Tensor, axis: str, neurons: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, columns) of the weights to flip for these neuron indices."""
        neurons = neurons.to(weight.device)
        lines = weight[neurons] if axis == "out" else weight[:, neurons].T  # one line of weights per neuron
        if self.weights == "largest":
            other = lines.abs().argmax(dim=1)
            own = neurons
        else:
            width = lines.shape[1]
            other = torch.arange(width, device=weight.device).repeat(len(neurons))
            own = neurons.repeat_interleave(width)
        return (own, other) if axis == "out" else (other, own)

    def flipped(self, weight: torch.Tensor, axis: str, neurons: torch.Tensor) -> torch.Tensor:
        """A copy of ``weight`` with these neurons' weights flipped."""
        out = weight.detach().clone()
        rows, cols = self.positions(out, axis, neurons)
        out[rows, cols] = flip_bit(out[rows, cols], resolve_bit(self.bit, out.dtype))
        return out


FAULTS: dict[str, type[Fault]] = {
    cls.name: cls for cls in (Zero, Mean, StuckAt, SignFlip, Noise, BitFlip, WeightBitFlip)
}


_WHOLE = re.compile(r"[+-]?[0-9]+")


def _convert(fault: str, key: str, text: str, annotation: str):
    """One parameter's text in the type its fault declares (``int``, ``float``, ``str``, or ``int | str``)."""
    kinds = set(annotation.replace(" ", "").split("|")) - {"None"}
    if "int" in kinds and _WHOLE.fullmatch(text):
        return int(text)
    if kinds == {"int"}:
        raise InputError(f"fault {fault}: {key} must be a whole number, got {text!r}")
    if "float" in kinds:
        try:
            number = float(text)
        except ValueError:
            raise InputError(f"fault {fault}: {key} must be a number, got {text!r}") from None
        # a whole number stays an int, so the fault's spec() reads as it was written (factor=2, not 2.0)
        return int(number) if _WHOLE.fullmatch(text) and math.isfinite(number) else number
    return text


def parse_fault(spec: str | Fault) -> Fault:
    """A fault from its spec string: ``name`` or ``name:key=value:key=value``.

    Each value is read in the type the fault's constructor declares (a bit position is a whole
    number, never ``3.5`` or ``1e1``); a parameter given twice or unknown to the fault is refused.
    """
    if isinstance(spec, Fault):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"not a fault spec: {spec!r}; e.g. zero, sign, bitflip:bit=exponent")
    name, *params = spec.strip().split(":")
    cls = FAULTS.get(name)
    if cls is None:
        raise InputError(f"unknown fault {name!r}; choose from {', '.join(FAULTS)}")
    kinds = {k: str(p.annotation) for k, p in inspect.signature(cls).parameters.items()}
    shown = repr(spec.strip())
    kwargs = {}
    for param in params:
        key, sep, value = param.partition("=")
        if not sep or not key:
            raise InputError(f"fault {shown}: parameters are key=value, separated by ':'")
        if key not in kinds:
            takes = ", ".join(kinds) or "no parameters"
            raise InputError(f"fault {shown}: {name} has no parameter {key!r} (it takes {takes})")
        if key in kwargs:
            raise InputError(f"fault {shown}: {key} is given twice")
        kwargs[key] = _convert(shown, key, value, kinds[key])
    return cls(**kwargs)


def check_fault(spec: str | Fault, dtype: str | torch.dtype) -> Fault:
    """Parse and check a fault against a model dtype (e.g. a bit that the dtype does not have)."""
    fault = parse_fault(spec)
    fault.check(DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype)
    return fault


@dataclass(frozen=True)
class RangeRestriction:
    """Clamp every channel of the given sites to [min, max] seen on clean images, widened by ``margin``
    times the channel's range on each side (NaN becomes 0), as Ranger does for CNNs."""

    stats: Mapping[str, ChannelStats]
    margin: float = 0.01

    def __post_init__(self) -> None:
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise InputError(f"range restriction margin must be a finite number >= 0, got {self.margin}")

    def bounds(self, name: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.stats[name]
        pad = (s.max - s.min) * self.margin
        return (s.min - pad).to(device=device, dtype=dtype), (s.max + pad).to(device=device, dtype=dtype)


def clamp(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(torch.clamp(x, lo, hi), nan=0.0)


@dataclass(frozen=True)
class ProtectedSet:
    """Neurons that faults cannot touch: removed from every mask (site name -> indices, or addresses)."""

    neurons: Mapping[str, torch.Tensor] | tuple[str, ...]


PROTECTIONS = ("protect_top", "range")
