"""Inflate the SD image VAE into the causal video VAE (the Open-Sora-Plan report's "tail initialization").

Every 2-D weight W (out, in, kh, kw) goes to the 3-D layer of the same name. A 3-D kernel with
kt = 3 taps sees frames t-2, t-1, t; `tail` puts W on the last tap, so each output frame sees only
its own input frame and the model equals the image VAE frame by frame wherever time is not
resampled. `center` (tap 1 = the previous frame) and `average` (W/3 everywhere) agree with it only
on still images; `random` loads nothing and trains from scratch. The temporal layers have no 2-D
counterpart and keep their fresh init.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .checkpoints import check_shapes, read_state_dict, sd_vae_config, sd_vae_to_compvis, set_provenance
from .errors import CvaeError
from .model import CausalVAE, CausalVAEConfig, v1_1_0_config
from .model.config import NORMS
from .model.layers import CausalConv3d

INITS = ("tail", "center", "average", "random")
ARCHS = ("v1.0.0", "v1.1.0")


def check_choices(init: str, arch: str | CausalVAEConfig, norm: str) -> None:
    """The one check of how to inflate (`cvae inflate`, `cvae train --inflate`, `inflate()`), made
    before any weights are read."""
    if init not in INITS:
        raise CvaeError(f"--init {init}: use one of {', '.join(INITS)}")
    if isinstance(arch, str) and arch not in ARCHS:
        raise CvaeError(f"--arch {arch}: use one of {', '.join(ARCHS)}")
    if norm not in NORMS:
        raise CvaeError(f"--norm {norm}: use one of {', '.join(NORMS)}")


def inflate_weight(w: torch.Tensor, kt: int, init: str) -> torch.Tensor:
    """(out, in, kh, kw) -> (out, in, kt, kh, kw) by `init`; one tap needs no choice."""
    if kt == 1:
        return w.unsqueeze(2)
    out = w.new_zeros(w.shape[0], w.shape[1], kt, *w.shape[2:])
    if init == "tail":
        out[:, :, kt - 1] = w
    elif init == "center":
        out[:, :, kt // 2] = w
    elif init == "average":
        out[:] = (w / kt).unsqueeze(2)
    else:
        raise ValueError(f"no 2-D weights to inflate with init {init!r} (`check_choices` comes first)")
    return out


def inflated_config(sd_config: dict[str, Any], norm: str = "frame", arch: str | CausalVAEConfig = "v1.0.0",
                    **overrides: Any) -> CausalVAEConfig:
    """The video VAE's layout for `arch`, sized like the SD VAE, with per-frame attention.

    `arch` is a released layout by name, or any config whose blocks (not widths) are wanted, e.g. a
    small model with 2-D blocks at full resolution."""
    levels = len(sd_config["hidden_size_mult"])
    fields: dict[str, Any] = dict(sd_config, norm=norm)
    if isinstance(arch, CausalVAEConfig):
        if len(arch.hidden_size_mult) != levels:
            raise CvaeError(f"the layout has {len(arch.hidden_size_mult)} levels, the SD VAE {levels}")
        fields = {**arch.to_dict(), **fields}
        arch = "v1.0.0"  # built as a plain config below
    elif arch == "v1.0.0":  # Open-Sora-Plan's per-level pattern, at the SD VAE's depth
        fields.update(
            encoder_attention="AttnBlock3DFix", decoder_attention="AttnBlock3DFix",
            encoder_resnet_blocks=("ResnetBlock3D",) * levels, decoder_resnet_blocks=("ResnetBlock3D",) * levels,
            encoder_spatial_downsample=tuple("SpatialDownsample2x" if i < levels - 1 else "" for i in range(levels)),
            encoder_temporal_downsample=tuple("TimeDownsample2x" if i < 2 else "" for i in range(levels)),
            decoder_spatial_upsample=tuple("SpatialUpsample2x" if i > 0 else "" for i in range(levels)),
            decoder_temporal_upsample=tuple("TimeUpsample2x" if i >= levels - 2 else "" for i in range(levels)))
    elif arch != "v1.1.0":
        raise ValueError(f"unknown arch {arch!r} (`check_choices` comes first)")
    fields.update(overrides)
    try:
        return CausalVAEConfig(**fields) if arch == "v1.0.0" else v1_1_0_config(**fields)
    except (TypeError, ValueError) as e:
        raise CvaeError(f"cannot build the {arch} layout for this SD VAE: {e}") from None


def _is_temporal(key: str) -> bool:
    return ".time_downsample." in key or ".time_upsample." in key


def image_vae_names(model: CausalVAE) -> dict[str, str]:
    """CompVis name -> the model's name, for every tensor of the model but its temporal layers'.

    A CausalConv3d `X` keeps its kernel in the nn.Conv3d `X.conv`, the image VAE in `X` itself;
    every other tensor (2-D blocks, norms) has the same name in both.
    """
    names = {}
    for key in model.state_dict():
        base, leaf = key.rsplit(".", 1)
        owner = base.removesuffix(".conv")
        image_key = f"{owner}.{leaf}" if owner != base and isinstance(model.get_submodule(owner), CausalConv3d) else key
        if not _is_temporal(key):
            names[image_key] = key
    return names


def check_image_vae(compvis: dict[str, torch.Tensor]) -> None:
    """Every tensor of an SD VAE there, with its shape, as the video VAE built for its size expects
    (its 3-D kernels seen without their time axis); a CvaeError names the first that is not."""
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = CausalVAE(inflated_config(sd_vae_config(compvis)))
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    expected = {image: tuple(s for i, s in enumerate(shapes[key]) if len(shapes[key]) < 5 or i != 2)
                for image, key in image_vae_names(model).items()}
    check_shapes(compvis, expected, "not an SD VAE state dict")


def load_2d_weights(model: CausalVAE, compvis: dict[str, torch.Tensor], init: str) -> None:
    """Copy CompVis-named 2-D weights into `model`, inflating where its layer is 3-D.

    Every weight of the model but its temporal layers must be filled, and every SD tensor must find a place.
    """
    target, names = model.state_dict(), image_vae_names(model)
    filled = set()
    with torch.no_grad():
        for key, w in compvis.items():
            if key not in names:
                raise CvaeError(f"the SD VAE's {key} has no place in the inflated model")
            name = names[key]
            t = target[name]
            value = inflate_weight(w, t.shape[2], init) if t.ndim == 5 and w.ndim == 4 else w
            if value.shape != t.shape:
                raise CvaeError(f"the SD VAE's {key} {tuple(w.shape)} does not fit {name} {tuple(t.shape)}")
            t.copy_(value)
            filled.add(name)
    left = [k for k in target if k not in filled and not _is_temporal(k)]
    if left:
        raise CvaeError(f"the SD VAE has nothing for {left[0]} of the inflated model ({len(left)} such weights)")


def inflate(source: dict[str, torch.Tensor] | str | Path, init: str = "tail", norm: str = "frame",
            arch: str | CausalVAEConfig = "v1.0.0", **config_overrides: Any) -> CausalVAE:
    """A causal video VAE made from an SD image VAE (a state dict, or any file `read_state_dict` reads).

    `config_overrides` change the layout (e.g. no temporal resampling, for tests). The returned
    model's provenance (init, arch, source) is what `save_model` writes into the file's metadata.
    """
    check_choices(init, arch, norm)
    compvis = sd_vae_to_compvis(source if isinstance(source, dict) else read_state_dict(source))
    check_image_vae(compvis)
    model = CausalVAE(inflated_config(sd_vae_config(compvis), norm, arch, **config_overrides)).eval()
    if init != "random":
        load_2d_weights(model, compvis, init)
    set_provenance(model, {"init": init, "arch": arch if isinstance(arch, str) else "custom",
                           "source": "state dict" if isinstance(source, dict) else str(source)})
    return model


def inflate_to_file(source: str | Path | None = None, init: str = "tail", arch: str = "v1.0.0", norm: str = "frame",
                    output: str | Path | None = None, overwrite: bool = False) -> tuple[Path, CausalVAE]:
    """What `cvae inflate` does: the SD VAE (`source`: a hub id or a local file; None: the default,
    from the cache or the hub) inflated and saved to `output` (None: where the default weights
    live, named for the choices). Existing weights are kept unless `overwrite`: latents made with
    them decode only with them. Returns the file written and the model."""
    from .checkpoints import DEFAULT_SD_VAE, fetch_sd_vae, inflated_weights, save_model
    from .outputs import check_suffix

    check_choices(init, arch, norm)
    output = Path(output or inflated_weights(init, arch, norm))
    check_suffix(output, [".safetensors"], "weights")
    if output.exists() and not overwrite:
        raise CvaeError(f"{output} exists: pass --overwrite to replace it (latents made with it will then "
                        "decode only with a copy of it)")
    path = fetch_sd_vae(source)
    if source and output.resolve() == Path(path).resolve():
        raise CvaeError(f"{output} is the input of this command: refusing to write over it")
    model = inflate(path, init=init, norm=norm, arch=arch)
    set_provenance(model, {"source": source or DEFAULT_SD_VAE})
    return save_model(model, output), model
