"""What weights are and where they came from: one record that travels with a model.

The identity (`model_id`) is computed from the tensors each time it is asked for, so weights
changed by training are never labelled with the id of the weights they started from. The one
memory it keeps is of the weights as loaded: a copy cast to bf16 or fp16 (a GPU run) still answers
with the id of the weights as read, so latents encoded in bf16 decode in fp32 and back. Provenance
(how the weights were made, trained, scored) is what `save_model` writes into a file's metadata.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

_CASTS = (torch.bfloat16, torch.float16)  # what a loaded model may be cast to and still be itself
_SLOT = "_cvae_record"  # the one attribute this module keeps on a model


@dataclass(frozen=True)
class Record:
    """provenance: strings saved with the weights (source, init, arch, trained_steps, ...).
    loaded: the id of the weights as loaded, and `casts`, the ids their bf16/fp16 copies hash to."""

    provenance: Mapping[str, str] = field(default_factory=dict)
    loaded: str | None = None
    casts: frozenset[str] = frozenset()


def digest(config_json: str, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> str:
    """sha256 over the config and, per tensor, its name, shape and ~4096 evenly spaced values as
    float32 (after a cast to `dtype`, when given): cheap on 229 M parameters, yet any retrained or
    differently inflated weights differ."""
    names = sorted(tensors)
    samples = []
    for name in names:
        flat = tensors[name].detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)]
        samples.append((sample if dtype is None else sample.to(dtype)).float())
    values = torch.cat(samples).cpu().numpy().tobytes() if samples else b""  # one copy off the device
    h, start = hashlib.sha256(config_json.encode()), 0
    for name, sample in zip(names, samples):
        h.update(f"{name}{tuple(tensors[name].shape)}".encode())
        h.update(values[start:start + 4 * sample.numel()])
        start += 4 * sample.numel()
    return h.hexdigest()[:12]


def record(model: nn.Module) -> Record:
    return getattr(model, _SLOT, None) or Record()


def provenance(model: nn.Module) -> dict[str, str]:
    return dict(record(model).provenance)


def remember_loaded(model: nn.Module, provenance: Mapping[str, str]) -> None:
    """Record the model's weights, as they stand, as the weights loaded (call before any cast)."""
    config, state = model.config.to_json(), model.state_dict()
    casts = frozenset(digest(config, state, dtype) for dtype in _CASTS)
    setattr(model, _SLOT, Record(dict(provenance), digest(config, state), casts))


def set_provenance(model: nn.Module, fields: Mapping[str, object], replace: bool = False) -> None:
    """Add to (or, with None, remove from; or `replace`) what is saved about how these weights were made."""
    old = record(model)
    provenance = dict(fields) if replace else {**old.provenance, **fields}
    setattr(model, _SLOT, Record({k: str(v) for k, v in provenance.items() if v is not None},
                                 old.loaded, old.casts))


def model_id(model: nn.Module) -> str:
    """A short identity of a model's weights as they stand now, for latent files to record: the
    same for the weights as loaded and their bf16/fp16 copies, different once they change."""
    now = digest(model.config.to_json(), model.state_dict())
    loaded = record(model)
    return loaded.loaded if loaded.loaded and now in loaded.casts else now
