"""Pretrained weights: torchvision's, a local file, or random initialisation with a warning."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


def load_pretrained(model: nn.Module, arch: str, source: str | None) -> str:
    """Load backbone weights into `model` in place and say where they came from.

    Args:
        model: a torchvision model (or a module whose state-dict keys match one).
        arch: the torchvision builder's name, e.g. "resnet18", "resnet50", "mobilenet_v3_large".
        source: None for random initialisation; "torchvision" (or "imagenet") for torchvision's
            default weights, which must already be in the torch hub cache on a machine without
            network; otherwise a path to a `.pth` file holding a state dict or a checkpoint
            dictionary with a "model" entry.

    Returns:
        "random", "torchvision" or the file path. Every fallback to random initialisation logs a
        warning, since a model trained from scratch needs far more data to be useful.
    """
    if source is None or source in ("", "none", "random"):
        log.warning("%s: no pretrained weights given; starting from random initialisation", arch)
        return "random"

    if source in ("torchvision", "imagenet", "default"):
        try:
            from torchvision.models import get_model_weights

            weights = get_model_weights(arch).DEFAULT
            state = weights.get_state_dict(progress=False)
        except Exception as err:  # offline, or a builder without weights
            log.warning(
                "%s: torchvision weights unavailable (%s); starting from random initialisation. "
                "Put the .pth file in the torch hub cache or pass its path instead.",
                arch,
                err,
            )
            return "random"
        _load_matching(model, state, f"torchvision {arch}")
        return "torchvision"

    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained weights {path} not found; pass an existing .pth file, 'torchvision', "
            "or nothing for random initialisation"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    _load_matching(model, state, str(path))
    return str(path)


def _load_matching(model: nn.Module, state: dict, origin: str) -> None:
    """Load the tensors whose names and shapes match; warn about the rest."""
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = len(state) - len(usable)
    missing = [k for k in own if k not in usable]
    if not usable:
        raise ValueError(f"{origin}: no tensor matches the model; is it the right architecture?")
    model.load_state_dict(usable, strict=False)
    if skipped or missing:
        log.warning(
            "%s: loaded %d tensors, skipped %d that do not fit, "
            "%d of the model's left as initialised",
            origin,
            len(usable),
            skipped,
            len(missing),
        )
    else:
        log.info("%s: loaded all %d tensors", origin, len(usable))
