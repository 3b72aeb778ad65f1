"""The `Tokenizer`: weights, device, dtype and speed options resolved once, and the policy for how
to cut an input (`Cut`, within a memory budget); what encode, decode, reconstruct and the dataset
runner all work through.

    from cvae_cli import Tokenizer
    tok = Tokenizer.load()                              # the default weights, auto device and dtype
    tok.encode("clip.mp4")                              # -> clip.safetensors
    tok.decode("clip.safetensors")                      # -> clip.decoded.mp4

The work itself is `convert`'s: a file in, a file out, and the same in memory here for frames a
caller already holds.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from . import media
from .budget import Policy
from .checkpoints import default_weights, load_model, model_id
from .convert import (Progress, ProgressFactory, Result, decode_file, encode_file, encode_many, latent_chunks,
                      one_by_one, open_latent, open_media_file, path_of, reconstruct_file, stored)
from .device import is_cuda, placement, resolve
from .errors import CvaeError
from .latents import LatentFile
from .model import CausalVAE, CausalVAEConfig
from .outputs import decoded_name, latent_name, recon_name, refuse_unsafe
from .selection import Selection
from .stream import DEFAULT_CHUNK, MODES, StreamOptions, choose_options, decode_latents, encode_frames, exact_streaming


# --- the cut policy ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Cut:
    """How inputs are cut for the model, as asked; what is left `auto` (mode "auto", chunk None,
    tile "auto") is chosen per frame size by `stream.choose_options`, within `memory_budget`
    (bytes) when one is given. A cut StreamOptions refuses is refused here, before any weights load."""

    mode: str = "auto"
    chunk: int | None = None
    tile: int | str | None = "auto"  # "auto", None (whole frames) or a tile side in pixels
    memory_budget: int | None = None

    def __post_init__(self):
        if self.mode not in ("auto", *MODES):
            raise CvaeError(f"--mode {self.mode}: use auto, {', '.join(MODES)}")
        try:
            StreamOptions(chunk=self.chunk or DEFAULT_CHUNK, tile=self.tile if isinstance(self.tile, int) else None)
        except ValueError as e:
            raise CvaeError(str(e)) from None

    def options(self, config: CausalVAEConfig, width: int, height: int, image: bool = False) -> StreamOptions:
        budget = {} if self.memory_budget is None else {"memory_budget": self.memory_budget}
        try:
            return choose_options(config, width, height, self.mode, self.chunk, self.tile, image, **budget)
        except ValueError as e:
            raise CvaeError(str(e)) from None


def _selection(select: Selection | None, fields: dict) -> Selection:
    if select is not None and fields:
        raise TypeError("pass either select= or the selection's fields, not both")
    return select if select is not None else Selection(**fields)


def _target(src: Path, dst: Path | str | None, name: str, overwrite: bool) -> Path:
    """Where a job writes: `dst`, or `name` beside the input; never the input itself, and never an
    existing file unless `overwrite`."""
    dst = Path(dst) if dst is not None else src.parent / name
    refuse_unsafe([(src, dst)])
    if dst.exists() and not overwrite:
        raise CvaeError(f"{dst} exists: pass overwrite=True to replace it")
    return dst


def _policy(model: CausalVAE, cut: Cut, direction: str, warn: Callable[[str], None]) -> Policy:
    """The cut for each input: the one asked for, the rest the largest that fits the memory budget
    (`cut.memory_budget` bytes, else what the device has free) for `direction`'s peak."""
    from .budget import Budget, default_budget

    device, dtype = placement(model)
    budget = Budget(cut.memory_budget, direction) if cut.memory_budget is not None else \
        default_budget(device, model, direction) or Budget(2**62, direction, source="unknown")
    return Policy(model.config, dtype, model.levers, budget, cut.mode, cut.chunk, cut.tile, warn=warn)


# --- the tokenizer ----------------------------------------------------------------------------

class Tokenizer:
    """A loaded model and the cut asked for: what encode, decode, reconstruct and the dataset
    runner all work through. `notes` and `warnings` say what loading chose on the user's behalf
    (the built-in model) or what will not work as they may expect (streaming a clip-norm model)."""

    def __init__(self, model: CausalVAE, cut: Cut = Cut(), notes: Sequence[str] = (), warnings: Sequence[str] = (),
                 policy: Policy | None = None):
        self.model, self.cut = model, cut
        self.notes, self.warnings = list(notes), list(warnings)
        self.policy = policy or _policy(model, cut, "reconstruct", self.warnings.append)

    @classmethod
    def load(cls, weights: str | Path | None = None, device: str | torch.device = "auto",
             dtype: str | torch.dtype = "auto", norm: str | None = None, fast: bool = False, compile: bool = False,
             mode: str = "auto", chunk: int | None = None, tile: int | str | None = "auto",
             memory_budget: int | None = None, *, local_rank: int | None = None,
             direction: str = "reconstruct", on_warning: Callable[[str], None] | None = None) -> Tokenizer:
        """Weights: a cvae .safetensors, an Open-Sora-Plan folder or hub id; None: the SD VAE
        `cvae inflate` made, else the built-in small model (said in `notes`). `device`/`dtype` auto:
        CUDA and bf16 when a GPU is visible, else the CPU in fp32. `norm` overrides the weights'
        GroupNorm (frame streams exactly); `fast` and `compile` are the speed levers proven equal to
        the plain model. `mode`, `chunk`, `tile`, `memory_budget`: how inputs are cut (`Cut`);
        `direction` (encode, decode or reconstruct): whose peak the budget holds. Warnings, now and
        while inputs run (a cut asked for that does not fit), go to `on_warning`, else to `warnings`."""
        cut = Cut(mode, chunk, tile, memory_budget)
        place, precision = resolve(device, dtype, local_rank)
        notes: list[str] = []
        warnings: list[str] = []
        warn = on_warning or warnings.append
        if place.type == "cpu" and precision == torch.float16:
            warn("--dtype fp16 on the CPU is about 20x slower than fp32 (the CPU has no fast fp16 kernels); "
                 "leave --dtype auto")
        if fast and not is_cuda(place):  # its levers are GPU ones: on a CPU the fused norm recompiles per shape
            warn("--fast does nothing on the CPU (fused GroupNorm+SiLU and cuDNN autotuning are GPU "
                 "levers; on a CPU the fused norm is compiled anew for each shape and runs slower)")
            fast = False
        if weights is None:
            weights, builtin = default_weights()
            if builtin:
                notes.append("using the built-in small model (cvae-small, trained on a CPU); "
                             "`cvae inflate` makes the better Stable Diffusion one")
        model = load_model(weights, norm=norm, device=place, dtype=precision)
        if fast or compile:
            from .accel import speed_up

            speed_up(model, fast=fast, compile=compile)
        if cut.mode == "stream" and not exact_streaming(model.config):
            warn("--mode stream only approximates this model (its norm or attention spans the whole "
                 "clip); --mode auto cuts it as Open-Sora-Plan does")
        return cls(model, cut, notes, warnings, _policy(model, cut, direction, warn))

    @property
    def device(self) -> torch.device:
        return placement(self.model)[0]

    @property
    def dtype(self) -> torch.dtype:
        return placement(self.model)[1]

    @property
    def model_id(self) -> str:
        return model_id(self.model)

    def options(self, width: int, height: int, image: bool = False, frames: int | None = None) -> StreamOptions:
        """How an input of this frame size is cut: what the cut fixes, the rest what fits the memory
        budget (`budget.Policy`)."""
        return self.policy(width, height, image, frames=frames)

    # file to file ----------------------------------------------------------------------------

    def encode(self, src: str | Path | media.MediaFile, dst: str | Path | None = None, *, select: Selection | None = None,
               seed: int | None = None, save_logvar: bool = False, overwrite: bool = False,
               progress: Progress | None = None, **selection) -> Result:
        """A video or image -> a latent file (default: X.safetensors beside X). `selection`: the
        fields of `Selection` (start, end, fps, size, max_side, allow_partial); `seed` stores a
        posterior sample instead of its mean."""
        path = path_of(src)
        dst = _target(path, dst, latent_name(path), overwrite)
        return encode_file(self.model, src, dst, self.policy, _selection(select, selection), seed=seed,
                           save_logvar=save_logvar, progress=progress)

    def encode_many(self, jobs: Sequence[tuple[Path, Path, Selection]], *, batch_size: int = 1,
                    seed: int | None = None, save_logvar: bool = False, progress: ProgressFactory | None = None,
                    note: Callable[[str], None] | None = None) -> Iterator[tuple[int, Result | Exception]]:
        """(job index, outcome) of many (input, output, selection) jobs, `batch_size` of one size at a
        time; an input's own failure is its outcome (`per_input`)."""
        return encode_many(self.model, jobs, self.policy, batch_size=batch_size, seed=seed,
                           save_logvar=save_logvar, progress=progress, note=note)

    def decode_many(self, jobs: Sequence[tuple[str | Path | LatentFile, Path]], *, crf: int = 18,
                    force: bool = False, progress: ProgressFactory | None = None,
                    note: Callable[[str], None] | None = None) -> Iterator[tuple[int, Result | Exception]]:
        """(job index, outcome) of many (latent, output) jobs, one at a time; an input's own failure
        is its outcome (`per_input`)."""
        return one_by_one(jobs, open_latent, lambda latent: latent.meta.frames,
                          lambda latent, dst, opts, advance: decode_file(self.model, latent, dst, opts, crf=crf,
                                                                         force=force, progress=advance),
                          self.policy, self.device, progress, note)

    def reconstruct_many(self, jobs: Sequence[tuple[str | Path | media.MediaFile, Path]], *,
                         select: Selection = Selection(), crf: int = 18, side_by_side: bool = False,
                         metrics: bool = True, progress: ProgressFactory | None = None,
                         note: Callable[[str], None] | None = None) -> Iterator[tuple[int, Result | Exception]]:
        """(job index, outcome) of many (input, output) reconstructions, one at a time; an input's
        own failure is its outcome (`per_input`)."""
        return one_by_one(jobs, open_media_file, lambda source: select.expected_frames(source.info),
                          lambda source, dst, opts, advance: reconstruct_file(
                              self.model, source, dst, opts, select, crf=crf, side_by_side=side_by_side,
                              metrics=metrics, progress=advance),
                          self.policy, self.device, progress, note)

    def decode(self, latent: str | Path | LatentFile, dst: str | Path | None = None, *, crf: int = 18,
               force: bool = False, overwrite: bool = False, progress: Progress | None = None) -> Result:
        """A latent file -> a video at its original size and rate (an image's -> an image);
        default X.decoded.mp4 / X.decoded.png beside it. `force` waives the weights' identity."""
        with contextlib.ExitStack() as stack:
            if not isinstance(latent, LatentFile):
                latent = stack.enter_context(LatentFile.open(latent))
            dst = _target(latent.path, dst, decoded_name(latent.path, latent.meta.fps is None), overwrite)
            return decode_file(self.model, latent, dst, self.policy, crf=crf, force=force, progress=progress)

    def reconstruct(self, src: str | Path | media.MediaFile, dst: str | Path | None = None, *,
                    select: Selection | None = None, crf: int = 18, side_by_side: bool = False, metrics: bool = True,
                    overwrite: bool = False, progress: Progress | None = None, **selection) -> Result:
        """Encode and decode in one pass (default X.recon.mp4 / X.recon.png beside X); the
        result's `metrics` hold the PSNR and SSIM of every frame against its input (unless
        `metrics` is False; `metrics_error` says why scoring stopped, the output written all the same)."""
        path = path_of(src)
        dst = _target(path, dst, recon_name(path, media.is_image(path)), overwrite)
        return reconstruct_file(self.model, src, dst, self.policy, _selection(select, selection), crf=crf,
                                side_by_side=side_by_side, metrics=metrics, progress=progress)

    # in memory -------------------------------------------------------------------------------

    def encode_frames(self, frames: Iterable[np.ndarray], *, seed: int | None = None) -> torch.Tensor:
        """uint8 RGB frames (T, H, W, 3), or any iterable of (H, W, 3) frames -> the latent
        (C, 1 + (T-1)/4 rounded up, H/8, W/8) in float32 on the CPU: the posterior mean, or with
        `seed` a sample (the same as `encode` stores)."""
        it = iter(frames)
        first = next(it, None)
        if first is None:
            raise CvaeError("no frames to encode")
        rest = list(itertools.islice(it, 1))
        options = self.options(first.shape[1], first.shape[0], image=not rest)
        chunks, done = [], 0
        for mean, logvar in encode_frames(self.model, itertools.chain([first], rest, it), options):
            latent = stored(mean, logvar, seed, done)
            chunks.append(latent.float().cpu())
            done += mean.shape[1]
        return torch.cat(chunks, dim=1)

    def decode_latent(self, latent: torch.Tensor, frames: int | None = None, height: int | None = None,
                      width: int | None = None) -> np.ndarray:
        """A latent (C, T', h, w) -> uint8 RGB frames (frames, height, width, 3): by default all
        1 + 4(T'-1) frames at 8x its size (pass the original count and size to crop the padding)."""
        c, t, h, w = latent.shape
        ft, fs = self.model.config.time_compression, self.model.config.space_compression
        height, width = height or h * fs, width or w * fs
        options = self.options(width, height, image=t == 1)
        chunks = decode_latents(self.model, latent_chunks(latent, options, self.model), options, height, width)
        out = np.concatenate(list(chunks))
        return out[: frames or 1 + ft * (t - 1)]


def recorded_norm(latents: Iterable[LatentFile]) -> str | None:
    """The GroupNorm the latents were made with (`encode --norm` changes it), when they agree:
    decode runs the weights with it unless told otherwise, so the latents decode as they were made."""
    norms = {latent.meta.config(str(latent.path)).norm for latent in latents}
    return norms.pop() if len(norms) == 1 else None
