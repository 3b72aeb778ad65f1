"""`cvae info`'s description of a file, in lines: latents, weights, videos and images."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from .errors import CvaeError

_WEIGHT_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


def describe(path: Path) -> Iterator[str]:
    """Lines that say what a file is: latents and weights (what cvae writes and reads) by their
    metadata, videos and images by what the container states or, where it states no length, what
    counting its packets found. CvaeError for a file that is none of these."""
    from . import media
    from .checkpoints import weights_info
    from .latents import LatentFile

    if not path.exists():
        raise CvaeError(f"no such file: {path}")

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                keys = f.metadata() or {}
        except Exception as e:
            raise CvaeError(f"{path} is not a readable safetensors file: {e}") from None
        if any(k.startswith("cvae.") for k in keys):
            with LatentFile.open(path) as latent:
                yield f"{path}: latents {tuple(latent.shape)} ({'with' if latent.has_logvar else 'no'} logvar)"
                for k, v in vars(latent.meta).items():
                    if k == "frame_times" and v is not None:
                        yield f"  {k}: {len(v)} times over {float(v[-1]):.3f} s (variable frame rate)"
                    elif k not in ("model_config", "frame_times"):
                        yield f"  {k}: {v}"
            return
    if path.is_dir() or path.suffix in (".safetensors", *_WEIGHT_SUFFIXES):
        info = weights_info(path)
        yield f"{path}: weights, {info['parameters'] / 1e6:.1f} M parameters, {info['dtype']}"
        for k, v in info.items():  # provenance: how the weights were made, trained, scored
            if k not in ("parameters", "dtype", "config", "format"):
                yield f"  {k}: {v}"
        if info.get("config"):
            yield f"  config: {json.dumps(info['config'], sort_keys=True)}"
        return
    try:
        m = media.probe(path)
    except CvaeError as e:
        raise CvaeError(f"{e} (cvae info describes videos, images, latents and weights)") from None
    if m.is_image:
        yield f"{path}: image, {m.width}x{m.height}, {m.codec}"
        return
    if m.frame_count is None:
        frames = "unknown (the container states none and no packet could be read)"
    elif m.frames_from == "packets":
        frames = f"{m.frame_count} (counted: " + (f"the container claims {m.claimed_frames})" if m.claimed_frames
                                                  else "the container does not state it)")
    elif m.frames_from == "duration":
        frames = f"about {m.frame_count} (from duration x rate)"
    else:
        frames = f"{m.frame_count} (as the container says)"
    yield f"{path}: video, {m.width}x{m.height}, {m.codec}"
    yield f"  frames: {frames}"
    yield f"  fps: {m.fps} ({float(m.fps):.3f})" if m.fps else "  fps: unknown"
    if m.rotation:
        yield f"  rotation: {m.rotation} degrees (applied when read)"
