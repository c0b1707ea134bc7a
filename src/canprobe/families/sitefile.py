"""A site file: the neuron sites of a model that has no adapter, declared in YAML (``--sites FILE``).

Example, for an InternVL-style language model whose FFN is ``w2(act(w1(x)) * w3(x))``::

    loader: image-text-to-text   # or causal-lm (a text-only model): the Auto class that loads it
    sites:
      - component: language      # language, vision or qformer
        module: language_model.model.layers.*.feed_forward.w2   # '*' stands for the layer number
        kind: down_proj          # the address scheme's name: language.layers.N.mlp.down_proj:J
        reading: output          # output (default) or input of the module
      - component: language
        module: language_model.model.layers.*.feed_forward.w2
        kind: down_proj.input
        reading: input
      - component: language
        module: language_model.model.layers.*.feed_forward.w3
        kind: up_proj

The neurons of a site are the last dimension of the module's output (or input). Their linear
layer (``weight``, a pattern like ``module``; default: the module itself, which must then be a
linear layer) gives their number and their weight rows (output reading) or columns (input
reading). Everything else (prompts, inputs) is the generic behaviour of ``Family``: the model's
processor (or tokenizer) is called with the instruction as given.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from canprobe.errors import InputError
from canprobe.families.base import READINGS, Family, SiteKind, chat_prompts, image_tokens

LOADERS = {"causal-lm": ("AutoModelForCausalLM", False), "image-text-to-text": ("AutoModelForImageTextToText", True)}
COMPONENTS = ("language", "vision", "qformer")
FIELDS = ("component", "module", "kind", "reading", "weight")


class SiteFileFamily(Family):
    """The family a site file describes (layer roots and site kinds from the file, the rest generic).

    Its prompt format is not known, so the user may write the image token: a prompt holding it once
    is used as given; without it, the processor's chat template places the image (one user turn),
    or, with no template, the image token goes before the instruction on its own line.
    """

    places_image = False

    def __init__(self, name: str, loader: str, layer_roots: dict, site_kinds: dict):
        self.name = name
        self.auto_class, self.takes_images = LOADERS[loader]
        self.encoder_inputs = ("pixel_values",) if self.takes_images else ()
        self.layer_roots = layer_roots
        self.site_kinds = site_kinds

    def prompts(self, processor, prompts):
        tokens = image_tokens(processor) if self.takes_images else []
        if not tokens:
            return list(prompts)
        wrapped = []
        for p in prompts:
            count = sum(p.count(t) for t in tokens)
            if count > 1:
                raise InputError(f"the prompt {p!r} holds the image token {count} times; one image is placed, once")
            if count == 1:
                wrapped.append(p)
            elif getattr(processor, "chat_template", None):
                wrapped += chat_prompts(processor, [p])
            else:
                wrapped.append(f"{tokens[0]}\n{p}")
        return wrapped


def _split(pattern: object, where: str) -> tuple[str, str]:
    """``root.*.inner`` -> (root, inner)."""
    parts = str(pattern).split(".")
    if not isinstance(pattern, str) or parts.count("*") != 1 or parts[0] == "*" or parts[-1] == "*":
        raise InputError(
            f"{where}: {pattern!r} must be a module path with one '*' for the layer number, e.g. "
            "model.layers.*.mlp.down_proj"
        )
    i = parts.index("*")
    return ".".join(parts[:i]), ".".join(parts[i + 1 :])


def read_site_file(path: str | Path) -> SiteFileFamily:
    """Parse and check a site file (see the module docstring); every problem is one InputError line."""
    from canprobe.data import read_text_file
    from canprobe.families import known_kinds

    path = Path(path)
    text = read_text_file(path, " (a site file)")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"cannot read site file {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("sites"), list) or not data["sites"]:
        raise InputError(f"{path}: a site file is a mapping with a non-empty 'sites' list (and 'loader')")
    unknown = set(data) - {"loader", "sites"}
    if unknown:
        raise InputError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; a site file has loader and sites")
    loader = data.get("loader", "causal-lm")
    if not isinstance(loader, str) or loader not in LOADERS:
        raise InputError(f"{path}: loader must be one of {', '.join(LOADERS)}, got {loader!r}")
    roots: dict[str, tuple[str, ...]] = {}
    kinds: dict[str, dict[str, SiteKind]] = {}
    for n, entry in enumerate(data["sites"], 1):
        where = f"{path}: site {n}"
        if not isinstance(entry, dict) or set(entry) - set(FIELDS) or not {"component", "module", "kind"} <= set(entry):
            raise InputError(f"{where}: give component, module and kind (optional: reading, weight), nothing else")
        component, kind, reading = entry["component"], entry["kind"], entry.get("reading", "output")
        if component not in COMPONENTS:
            raise InputError(f"{where}: component must be one of {', '.join(COMPONENTS)}, got {component!r}")
        if kind not in known_kinds(component):
            raise InputError(
                f"{where}: {component} has no site kind {kind!r}; kinds: {', '.join(known_kinds(component))}"
            )
        if reading not in READINGS:
            raise InputError(f"{where}: reading must be output or input, got {reading!r}")
        root, module = _split(entry["module"], where)
        weight_root, weight = _split(entry.get("weight", entry["module"]), where)
        if weight_root != root or roots.get(component, (root,)) != (root,):
            raise InputError(f"{where}: every {component} site must sit under the same layer list ({root}.*)")
        if kind in kinds.get(component, {}):
            raise InputError(f"{where}: {component}.{kind} is declared twice")
        roots[component] = (root,)
        axis = "out" if reading == "output" else "in"
        kinds.setdefault(component, {})[kind] = SiteKind(module, reading, weight, axis)
    return SiteFileFamily(f"site file {path.name}", loader, roots, kinds)
