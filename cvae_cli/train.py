"""`cvae train`: fine-tune a causal VAE (or train one from scratch), on one CPU or many GPUs.

    start (weights | inflated SD VAE | config) -> CausalVAE ─┐
    data -> `trainset` batches ──────────────────────────────┴─> `losses` -> AdamW -> OUT/
                                                    checkpoint.pt, loss.csv, loss.png, samples-STEP.png, final.safetensors

Reproducible and resumable: every random draw (which sample, crop, camera path, posterior noise)
is a function of (seed, step, sample index), so the data position and the RNG state *are* the step
number. A checkpoint holds weights, optimiser, EMA, discriminator, the step and the loss sums of the
current log row; running the same command again resumes from it and, on the CPU, reproduces the
uninterrupted run's losses exactly. Under torchrun each rank takes its slice of every global batch
(distributed data parallel); only rank 0 writes files and prints.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import functools
import json
import math
import tempfile
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import interrupt, losses, stream, trainset
from .atomic import atomic_path
from .checkpoints import load_model, provenance, save_model, save_sd_vae, set_provenance
from .errors import CvaeError
from .metrics import psnr, ssim
from .plot import LOSS_CSV, plot_runs, read_rows
from .model import CausalVAE, CausalVAEConfig, DiagonalGaussian, image_config, v1_1_0_config
from .model.blocks import AttnBlock3DFix, ResnetBlock2D, ResnetBlock3D

CHECKPOINT = "checkpoint.pt"
FINAL = "final.safetensors"
FINAL_SD = "final-sd-vae.safetensors"  # an image model, also in the SD VAE's own layout
CHECKPOINT_VERSION = 1
TRAINABLE = ("all", "temporal", "decoder")
NAMED_CONFIGS = {"image": image_config, "v1.0.0": CausalVAEConfig, "v1.1.0": v1_1_0_config}


# --- options, declared once ----------------------------------------------------------------------
#
# Each option of `cvae train` is one dataclass field here (or in `trainset.SampleSpec`), whose
# metadata holds its help text, its flag when that is not the field's name, its bounds, and whether
# changing it between a run and its resumption makes it another run ("identity"). The command's
# parameters, the options object and the run's identity are all derived from these fields.

def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None, short: str | None = None,
           min: float | None = None, identity: bool = False, factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field that is also a `cvae train` option (see the comment above)."""
    metadata = {"help": help, "flag": flag, "short": short, "min": min, "identity": identity}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Declared:
    """One option: its field, its type (resolved), and the attribute path from the outer object."""

    field: dataclasses.Field
    type: Any
    path: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.field.name

    @property
    def flag(self) -> str:
        return self.field.metadata.get("flag") or "--" + self.name.replace("_", "-")


def option_fields(cls) -> list[Declared]:
    """Every option of a dataclass, in order, with nested option groups flattened."""
    hints, out = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        if f.metadata.get("group"):
            out += [dataclasses.replace(d, path=(f.name, *d.path)) for d in option_fields(f.metadata["group"])]
        elif "help" in f.metadata:
            out.append(Declared(f, hints[f.name], (f.name,)))
    return out


def from_flat(cls, values: dict[str, Any]):
    """`cls` built from {field name: value} of its options, nested groups included (what the command
    line gives); options left out keep their defaults."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("group"):
            kwargs[f.name] = from_flat(f.metadata["group"], values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


@dataclass(frozen=True)
class Start:
    """Exactly one of: `weights` (anything `load_model` reads), `inflate` (an SD VAE file, inflated
    with `init` into layout `arch` with `norm`), or `config` (a named layout or a JSON file: fresh
    random weights)."""

    weights: str | None = option(None, "Start from these weights (a cvae .safetensors, an Open-Sora-Plan "
                                       "folder or hub id).", short="-w")
    inflate: str | None = option(None, "Start from this SD image VAE (file or hub id), inflated with "
                                       "--init/--arch/--norm as `cvae inflate` does.")
    init: str = option("tail", "With --inflate: tail, center, average or random.")
    arch: str = option("v1.0.0", "With --inflate: v1.0.0, v1.1.0, or a JSON layout file.")
    norm: str = option("frame", "With --inflate: frame or clip.")
    config: str | None = option(None, "Start from scratch: image (SD's all-2-D image VAE), v1.0.0, v1.1.0, or a "
                                      "JSON file of config fields (\"base\": one of those names).")

    def __post_init__(self):
        given = [name for name in ("weights", "inflate", "config") if getattr(self, name)]
        if len(given) != 1:
            raise CvaeError("give exactly one starting point: --weights, --inflate or --config"
                            + (f" (got {', '.join('--' + g for g in given)})" if given else ""))
        if self.inflate:
            from .inflate import ARCHS, check_choices

            check_choices(self.init, self.arch if self.arch in ARCHS else "v1.0.0", self.norm)  # a layout file: read later

    def describe(self) -> str:
        if self.weights:
            return f"weights {self.weights}"
        if self.inflate:
            return f"inflate {self.inflate} init {self.init} arch {self.arch} norm {self.norm}"
        return f"config {self.config}"

    def warnings(self) -> list[str]:
        """Settings that are ignored as given."""
        if self.inflate:
            return []
        changed = [f"--{name} {getattr(self, name)}" for name in ("init", "arch", "norm")
                   if getattr(self, name) != Start.__dataclass_fields__[name].default]
        return [f"{', '.join(changed)} only appl{'ies' if len(changed) == 1 else 'y'} with --inflate: ignored"] if changed else []

    def build(self) -> CausalVAE:
        if self.weights:
            return load_model(self.weights)
        if self.inflate:
            from .checkpoints import fetch_sd_vae
            from .inflate import ARCHS, inflate

            arch = self.arch if self.arch in ARCHS else read_config(self.arch)
            model = inflate(fetch_sd_vae(self.inflate), init=self.init, norm=self.norm, arch=arch)
            set_provenance(model, {"source": self.inflate})
            return model
        model = CausalVAE(read_config(self.config))
        set_provenance(model, {"init": "random", "arch": self.config})
        return model


def read_config(name_or_file: str) -> CausalVAEConfig:
    """A named layout (`image`: the SD image VAE, all 2-D; `v1.0.0`, `v1.1.0`: the releases, at
    their full width) or a JSON file of `CausalVAEConfig` fields (a `"base"` key names the layout
    the other fields change)."""
    if name_or_file in NAMED_CONFIGS:
        return NAMED_CONFIGS[name_or_file]()
    path = Path(name_or_file)
    if not path.is_file():
        raise CvaeError(f"--config {name_or_file}: neither a file nor one of {', '.join(NAMED_CONFIGS)}")
    try:
        fields = json.loads(path.read_text())
        if not isinstance(fields, dict):
            raise ValueError("not a JSON object")
        base = fields.pop("base", "v1.0.0")
        if base not in NAMED_CONFIGS:
            raise ValueError(f"base {base!r} is not one of {', '.join(NAMED_CONFIGS)}")
        return NAMED_CONFIGS[base](**fields)
    except (OSError, ValueError, TypeError) as e:
        raise CvaeError(f"{path} is not a usable model config: {e}") from None


VIDEO_FRAMES = 17  # --frames for a video model when none is given


@dataclass
class TrainOptions:
    """Everything a run needs besides its starting point."""

    out: Path = option(help="Run folder: checkpoint.pt, loss.csv, loss.png, samples-STEP.png, final.safetensors. "
                            "Run the same command again to resume.")
    data: list[str] = option(help="Training media: folders, globs, files, or manifests (.txt/.csv/.jsonl as for "
                                  "`encode --manifest`). Repeatable.")
    val: list[str] = option(help="Held-out media scored every --val-every steps (one centre-cropped sample per "
                                 "file). Repeatable.", factory=list)
    steps: int = option(1000, "Optimiser steps in all (may grow when resuming).", min=1)
    batch_size: int = option(8, "Samples per step, per process.", short="-b", min=1, identity=True)
    lr: float = option(1e-4, "Peak learning rate (AdamW; linear warm-up, cosine to lr/10).", identity=True)
    warmup: int = option(100, "Warm-up steps.", min=0, identity=True)
    weight_decay: float = option(0.01, "AdamW weight decay.", min=0, identity=True)
    clip_grad: float = option(1.0, "Clip the gradient norm at this (0: off).", min=0, identity=True)
    ema: float | None = option(None, "Keep an EMA of the weights with this decay (e.g. 0.999); validation and "
                                     "final.safetensors use it.", identity=True)
    seed: int = option(0, "Seed of every random draw: data, crops, noise.", identity=True)
    sample: trainset.SampleSpec = field(default_factory=trainset.SampleSpec,
                                        metadata={"group": trainset.SampleSpec})
    kl_weight: float = option(1e-6, "KL weight (Open-Sora-Plan's scale).", identity=True)
    lpips: list[str] = option(help="LPIPS weights, local files: lpips' vgg.pth and torchvision's VGG16 weights. "
                                   "Off without.", factory=list)
    perceptual_weight: float = option(1.0, "Weight of the LPIPS term.", identity=True)
    disc_start: int | None = option(None, "Add a 3-D patch discriminator (hinge loss, adaptive weight) from this "
                                          "step on.", identity=True)
    disc_weight: float = option(0.5, "Scale of the adaptive GAN weight.", identity=True)
    train: str = option("all", "Which weights learn: all, temporal (layers that span frames) or decoder.",
                        identity=True)
    checkpointing: bool = option(False, "Recompute block activations in the backward pass: less memory, about "
                                        "1/3 more compute.")
    save_every: int = option(500, "Checkpoint every N steps.", min=1)
    val_every: int = option(500, "Validate every N steps.", min=1)
    log_every: int = option(10, "A loss.csv row every N steps.", min=1)
    workers: int = option(2, "Data-loading processes.", min=0)
    device: str = option("auto", "auto, cpu, cuda or cuda:N (under torchrun: the rank's GPU).")

    def resolved(self, config: CausalVAEConfig) -> "TrainOptions":
        """These options with what is left to the model decided: --frames is 1 for an image model."""
        if self.sample.frames is not None:
            return self
        frames = 1 if config.is_image_model else VIDEO_FRAMES
        return dataclasses.replace(self, sample=dataclasses.replace(self.sample, frames=frames))

    def check(self, config: CausalVAEConfig) -> None:
        """Refuse what cannot work, before any work (frames that do not fit the model, bad ranges)."""
        ft, fs = config.time_compression, config.space_compression
        frames, size = self.sample.frames, self.sample.size
        if frames < 1 or (frames - 1) % ft:
            raise CvaeError(f"--frames {frames}: this model needs 1 + {ft}k frames (1, {1 + ft}, {1 + 2 * ft}, ...)")
        if size < fs or size % fs:
            raise CvaeError(f"--size {size}: must be a multiple of {fs}")
        for name, value, ok in (("--steps", self.steps, self.steps >= 1), ("--batch-size", self.batch_size, self.batch_size >= 1),
                                ("--lr", self.lr, self.lr > 0), ("--stride", self.sample.stride, self.sample.stride >= 1),
                                ("--image-ratio", self.sample.image_ratio, 0 <= self.sample.image_ratio <= 1),
                                ("--photo-motion", self.sample.photo_motion, 0 <= self.sample.photo_motion <= 1),
                                ("--ema", self.ema, self.ema is None or 0 < self.ema < 1),
                                ("--save-every", self.save_every, self.save_every >= 1),
                                ("--val-every", self.val_every, self.val_every >= 1),
                                ("--log-every", self.log_every, self.log_every >= 1)):
            if not ok:
                raise CvaeError(f"{name} {value}: out of range")
        if self.train not in TRAINABLE:
            raise CvaeError(f"--train {self.train}: use one of {', '.join(TRAINABLE)}")

    def warnings(self, config: CausalVAEConfig) -> list[str]:
        """Settings that run but cannot do what they are meant to (ignored, or self-defeating)."""
        s, out = self.sample, []
        changed = {d.name for d in option_fields(TrainOptions) if _get(self, d.path) != _default(d.field)}
        if self.warmup >= self.steps:
            out.append(f"--warmup {self.warmup} is not shorter than --steps {self.steps}: the learning rate never "
                       f"reaches --lr {self.lr:g} (lower --warmup)")
        if self.ema is not None and 1 / (1 - self.ema) > self.steps / 2:
            out.append(f"--ema {self.ema:g} averages over about {1 / (1 - self.ema):.0f} steps, against --steps "
                       f"{self.steps}: the final weights stay close to the start (lower the decay)")
        if config.is_image_model and s.frames > 1:
            out.append(f"an image model codes every frame alone: --frames {s.frames} makes each step {s.frames}x "
                       "the work and teaches it nothing across time (use --frames 1)")
        if s.frames == 1:
            ignored = [f"--{n.replace('_', '-')} {getattr(s, n):g}" for n in ("image_ratio", "photo_motion", "stride")
                       if n in changed]
            if ignored:
                out.append(f"{', '.join(ignored)} only appl{'ies' if len(ignored) == 1 else 'y'} to clips, and --frames 1 "
                           "trains on single images: ignored")
        elif s.image_ratio == 1 and s.photo_motion:
            out.append("--photo-motion only applies to clips, and --image-ratio 1 trains on single images: ignored")
        if self.disc_start is not None and self.disc_start >= self.steps:
            out.append(f"--disc-start {self.disc_start} is not before --steps {self.steps}: the discriminator never runs")
        if self.disc_start is None and "disc_weight" in changed:
            out.append("--disc-weight only applies with --disc-start: ignored")
        if not self.lpips and "perceptual_weight" in changed:
            out.append("--perceptual-weight only applies with --lpips: ignored")
        if not self.val and "val_every" in changed:
            out.append("--val-every only applies with --val: ignored")
        return out

    def identity(self, start: Start, data_digest: str, world: int) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed by these options."""
        ident = {d.name: _get(self, d.path) for d in option_fields(TrainOptions) if d.field.metadata.get("identity")}
        ident.update(start=start.describe(), data=data_digest, world=world, lpips=sorted(map(str, self.lpips)))
        return ident


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _get(obj, path: tuple[str, ...]):
    for name in path:
        obj = getattr(obj, name)
    return obj


def learning_rate(step: int, opts: TrainOptions) -> float:
    """Linear warm-up over `warmup` steps, then a cosine from `lr` down to lr/10 at the last step."""
    warm = min(1.0, (step + 1) / max(1, opts.warmup))
    progress = min(1.0, max(0.0, (step - opts.warmup) / max(1, opts.steps - opts.warmup)))
    return opts.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# --- the model as it trains -----------------------------------------------------------------------

class Autoencoder(nn.Module):
    """encode -> posterior sample -> decode as one module: what DDP wraps, so one forward and one
    backward per step synchronise gradients. Each sample's noise comes from its own seed, so it
    does not depend on how the global batch is split between ranks."""

    def __init__(self, vae: CausalVAE):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, noise_seeds: list[int]):
        posterior = self.vae.encode(x)
        z = torch.cat([DiagonalGaussian(posterior.mean[i:i + 1], posterior.logvar[i:i + 1])
                       .sample(torch.Generator().manual_seed(s)) for i, s in enumerate(noise_seeds)])
        return self.vae.decode(z), posterior.mean, posterior.logvar


def noise_seed(seed: int, sample: int) -> int:
    """The posterior noise seed of one sample of the run (stable across processes and restarts)."""
    return int(np.random.SeedSequence([seed, 2, sample]).generate_state(1)[0])


def select_trainable(vae: CausalVAE, which: str) -> list[nn.Parameter]:
    """Freeze all but `which`: all; temporal (every layer whose kernel spans several frames, and the
    learned temporal resampling); decoder (decoder and post_quant_conv)."""
    from .model.layers import CausalConv3d, TimeDownsampleRes2x, TimeUpsampleRes2x

    if which == "all":
        chosen = set(vae.parameters())
    elif which == "decoder":
        chosen = set(vae.decoder.parameters()) | set(vae.post_quant_conv.parameters())
    else:
        chosen = set()
        for m in vae.modules():
            if isinstance(m, (TimeDownsampleRes2x, TimeUpsampleRes2x)) or (
                    isinstance(m, CausalConv3d) and m.time_kernel > 1):
                chosen |= set(m.parameters())
        if not chosen:
            raise CvaeError("--train temporal: this model has no temporal layers")
    for p in vae.parameters():
        p.requires_grad_(p in chosen)
    return [p for p in vae.parameters() if p.requires_grad]


def checkpoint_blocks(vae: CausalVAE) -> None:
    """Activation checkpointing per resnet and attention block: their activations are recomputed
    in the backward pass instead of kept, trading about a third more compute for memory. The
    blocks' `forward` is wrapped in place, so parameter names (and saved files) do not change."""
    from torch.utils.checkpoint import checkpoint

    def wrap(forward):
        return functools.wraps(forward)(lambda x, cache=None: checkpoint(forward, x, cache, use_reentrant=False))

    for m in vae.modules():
        if isinstance(m, (ResnetBlock3D, ResnetBlock2D, AttnBlock3DFix)):
            m.forward = wrap(m.forward)


def last_layer(vae: CausalVAE) -> torch.Tensor:
    conv = vae.decoder.conv_out
    return getattr(conv, "conv", conv).weight


# --- what a run leaves ------------------------------------------------------------------------------

LOSS_COLUMNS = ("loss", "l1", "kl", "lpips", "g_loss", "d_weight", "d_loss")
CSV_COLUMNS = ("step",) + LOSS_COLUMNS + ("lr", "samples_per_s", "val_psnr", "val_ssim")


class LossLog:
    """loss.csv: a row every `log_every` steps (means of each term since the last row) and at every
    validation. Rows past a checkpoint are dropped on resume, so the file always matches a run."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        rows = read_rows(path) if resume_step and path.exists() else []
        with atomic_path(path) as tmp:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, CSV_COLUMNS)
                w.writeheader()
                w.writerows(r for r in rows if int(r["step"]) <= resume_step)

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, CSV_COLUMNS).writerow({k: _cell(row.get(k)) for k in CSV_COLUMNS})


def _cell(v) -> str:
    return "" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] pixels (C, T, H, W) -> uint8 frames (T, C, H, W), rounded as a written video is."""
    return stream.to_uint8(x).transpose(0, 1)


def write_samples(path: Path, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Inputs above reconstructions: the first and last frame of each validation sample."""
    from PIL import Image

    tops, bottoms = [], []
    for x, y in pairs:
        a, b = to_uint8(x), to_uint8(y)
        for t in sorted({0, a.shape[0] - 1}):
            tops.append(a[t].permute(1, 2, 0).numpy())
            bottoms.append(b[t].permute(1, 2, 0).numpy())
    grid = np.concatenate([np.concatenate(tops, axis=1), np.concatenate(bottoms, axis=1)], axis=0)
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")


# --- the run --------------------------------------------------------------------------------------

@dataclass
class Report:
    """How a run talks: `note` for lines, `begin` (first step, total) just before the first step,
    `row` after each logged row, `advance` (step, total) after each step."""

    note: Callable[[str], None] = lambda message: None
    row: Callable[[dict[str, Any]], None] = lambda row: None
    begin: Callable[[int, int], None] = lambda step, total: None
    advance: Callable[[int, int], None] = lambda step, total: None


class Trainer:
    def __init__(self, opts: TrainOptions, start: Start, dist=None, report: Report | None = None):
        from .distributed import Dist

        self.opts, self.start, self.report = opts, start, report or Report()
        self.dist = dist or Dist()
        self.rank0 = self.dist.rank == 0
        self.out = Path(opts.out)

    # setup ---------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Everything that can fail on bad input, before any training work."""
        opts = self.opts
        self._check_out()
        ckpt_path = self.out / CHECKPOINT
        self.checkpoint = self._read_checkpoint(ckpt_path) if ckpt_path.exists() else None
        self.data = trainset.survey(opts.data, opts.sample.size)
        if not self.data.sources:
            raise CvaeError(f"no usable data in --data {' '.join(map(str, opts.data))}"
                            + (f" ({len(self.data.skipped)} files skipped: {self.data.skipped[0][1]})"
                               if self.data.skipped else ""))
        for path, reason in self.data.skipped:
            self.report.note(f"skipped {path}: {reason}")
        if self.checkpoint is not None:
            config = CausalVAEConfig.from_dict(self.checkpoint["config"])
            with torch.device("meta"):
                self.vae = CausalVAE(config)
            self.vae.load_state_dict(self.checkpoint["model"], assign=True)
            set_provenance(self.vae, self.checkpoint["provenance"])
        else:
            torch.manual_seed(opts.seed)  # fresh weights (a config, inflated temporal layers) follow the seed
            self.vae = self.start.build()
        self.opts = opts = opts.resolved(self.vae.config)
        opts.check(self.vae.config)
        self.identity = opts.identity(self.start, self.data.digest(), self.dist.world)
        if self.checkpoint is not None:
            self._check_resumable()
        for warning in self.start.warnings() + opts.warnings(self.vae.config):
            self.report.note(f"warning: {warning}")
        spec = opts.sample
        self.val = (trainset.validation_set(trainset.survey(opts.val, spec.size), spec.frames, spec.size,
                                            self.vae.config.time_compression) if opts.val else [])
        if opts.val and not self.val:
            raise CvaeError(f"no usable validation data in --val {' '.join(map(str, opts.val))}")
        self.dataset = trainset.TrainingClips(self.data, spec, opts.seed, opts.batch_size * self.dist.world)
        self.lpips = losses.LPIPS.from_files(opts.lpips) if opts.lpips else None

    def _check_out(self) -> None:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=self.out).close()
        except OSError as e:
            raise CvaeError(f"--out {self.out} is not writable: {getattr(e, 'strerror', None) or e}") from None

    def _read_checkpoint(self, path: Path) -> dict:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CvaeError(f"{path} is not a readable checkpoint ({type(e).__name__}): remove it to start over") from None
        if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION:
            raise CvaeError(f"{path} is not a checkpoint this cvae writes: remove it to start over")
        return ckpt

    def _check_resumable(self) -> None:
        saved = self.checkpoint["identity"]
        for key, value in self.identity.items():
            if saved.get(key) != value:
                raise CvaeError(f"{self.out} holds a run with {key} {saved.get(key)!r}, not {value!r}: "
                                "use another --out to start a new run")
        if self.checkpoint["step"] > self.opts.steps:
            raise CvaeError(f"{self.out} is already at step {self.checkpoint['step']}, past --steps {self.opts.steps}")

    # the loop ----------------------------------------------------------------------------------

    def run(self) -> Path:
        opts, dist = self.opts, self.dist
        device = torch.device(dist.device(opts.device))  # CvaeError for a GPU that is not there
        autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
        step = self.checkpoint["step"] if self.checkpoint else 0
        if step == opts.steps and (self.out / FINAL).exists():
            self.report.note(f"{self.out} is complete at step {step}: nothing to do (raise --steps to train on)")
            return self.out / FINAL
        vae = self.vae.to(device).train()
        params = select_trainable(vae, opts.train)
        ema = copy.deepcopy(vae).eval().requires_grad_(False) if opts.ema else None
        if opts.checkpointing:
            checkpoint_blocks(vae)
        model: nn.Module = Autoencoder(vae)
        dist.start(str(device))
        if dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
        disc = d_opt = None
        if opts.disc_start is not None:
            disc = losses.PatchDiscriminator3D().to(device).train()
            d_opt = torch.optim.AdamW(disc.parameters(), lr=opts.lr, betas=(0.5, 0.9), weight_decay=opts.weight_decay)
        lpips = self.lpips.to(device) if self.lpips is not None else None
        sums: dict[str, float] = {}
        if self.checkpoint:
            optimizer.load_state_dict(self.checkpoint["optimizer"])
            if ema is not None:
                ema.load_state_dict(self.checkpoint["ema"])
            if disc is not None:
                disc.load_state_dict(self.checkpoint["disc"])
                d_opt.load_state_dict(self.checkpoint["disc_optimizer"])
            sums = dict(self.checkpoint["sums"])
        log = LossLog(self.out / LOSS_CSV, step) if self.rank0 else None
        spec = opts.sample
        what = (f"batches of {opts.batch_size * dist.world} "
                + ("images" if spec.frames == 1 else f"{spec.frames}-frame clips") + f" at {spec.size}x{spec.size}")
        if step:
            self.report.note(f"resuming from step {step} of {opts.steps} ({self.out / CHECKPOINT}): {what}")
        else:
            self.report.note(f"training {opts.steps} step{'' if opts.steps == 1 else 's'} on {device}: {what}")
        self.checkpoint = None  # free its tensors
        batches = trainset.loader(self.dataset, step, opts.steps, opts.batch_size, dist.rank, dist.world, opts.workers)
        self.report.begin(step, opts.steps)
        row_start, unreadable = time.perf_counter(), set()
        global_batch = opts.batch_size * dist.world
        begun = saved = step

        def stop_if_asked() -> None:
            """Ctrl-C, SIGTERM: stop between steps, with the step the run is on saved."""
            stop = interrupt.pending()
            if stop is None:
                return
            if step != saved:
                self._save_checkpoint(step, vae, optimizer, ema, disc, d_opt, sums)
            outcome = (f"stopped at step {step}, saved in {self.out / CHECKPOINT}: run the same command again to resume"
                       if step != begun else f"stopped at step {step}, before training on: nothing new to save")
            raise interrupt.Interrupted(stop.reason, stop.status, outcome=outcome)

        for x, failures in batches:
            stop_if_asked()  # asked while the batch loaded: not one step more
            for path, reason in failures:
                if path not in unreadable:
                    unreadable.add(path)
                    self.report.note(f"skipped {path} in sampling: {reason}")
            for g in optimizer.param_groups:
                g["lr"] = learning_rate(step, opts)
            x = x.to(device, non_blocking=True)
            first = step * global_batch + dist.rank * opts.batch_size
            seeds = [noise_seed(opts.seed, first + i) for i in range(x.shape[0])]
            terms = self._step(model, vae, x, seeds, optimizer, disc, d_opt, lpips, step, autocast, params)
            if ema is not None:
                with torch.no_grad():
                    for e, p in zip(ema.parameters(), vae.parameters()):
                        e.lerp_(p, 1 - opts.ema)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            sums["n"] = sums.get("n", 0) + 1
            step += 1
            self.report.advance(step, opts.steps)
            is_val = bool(self.val) and (step % opts.val_every == 0 or step == opts.steps)
            if step % opts.log_every == 0 or is_val or step == opts.steps:
                now = time.perf_counter()
                row = {"step": step, "lr": learning_rate(step - 1, opts),
                       "samples_per_s": sums["n"] * global_batch / max(now - row_start, 1e-9)}
                row.update({k: sums[k] / sums["n"] for k in LOSS_COLUMNS if k in sums})
                if is_val and self.rank0:
                    row.update(self._validate(ema or vae, device, autocast, step))
                if log is not None:
                    log.write(row)
                    self.report.row(row)
                sums, row_start = {}, time.perf_counter()
            if step % opts.save_every == 0 or step == opts.steps:
                self._save_checkpoint(step, vae, optimizer, ema, disc, d_opt, sums)
                saved = step
            stop_if_asked()
        if self.rank0:
            return self._finish(ema or vae, step)
        return self.out / FINAL

    def _step(self, model, vae, x, seeds, optimizer, disc, d_opt, lpips, step, autocast, params) -> dict[str, float]:
        opts = self.opts
        n = x[0].numel()
        with autocast:
            recon, mean, logvar = model(x, seeds)
            l1 = (recon.float() - x).abs().mean()
            rec = l1
            terms = {"l1": l1.item()}
            if lpips is not None:
                p = lpips(x, recon.float()).mean()
                rec = rec + opts.perceptual_weight * p
                terms["lpips"] = p.item()
            kl = losses.kl_divergence(mean.float(), logvar.float()).mean()
            loss = rec + opts.kl_weight * kl / n
            terms["kl"] = kl.item()
            gan = disc is not None and step >= opts.disc_start
            if gan:
                disc.requires_grad_(False)
                g_loss = -disc(recon).float().mean()
                weight = losses.adaptive_weight(rec, g_loss, last_layer(vae), opts.disc_weight)
                disc.requires_grad_(True)
                loss = loss + weight * g_loss
                terms.update(g_loss=g_loss.item(), d_weight=weight.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if opts.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, opts.clip_grad)
        optimizer.step()
        terms["loss"] = loss.item()
        if gan:
            with autocast:
                d_loss = losses.hinge_d_loss(disc(x).float(), disc(recon.detach()).float())
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self._average_gradients(disc)
            d_opt.step()
            terms["d_loss"] = d_loss.item()
        if self.dist.world > 1:  # what loss.csv reports is the global batch's mean, as in one process
            import torch.distributed as td

            values = torch.tensor([terms[k] for k in sorted(terms)], dtype=torch.float64, device=x.device)
            td.all_reduce(values)
            terms = dict(zip(sorted(terms), (values / self.dist.world).tolist()))
        if not math.isfinite(terms["loss"]):
            raise CvaeError(f"the loss is {terms['loss']} at step {step + 1}: lower --lr (or raise --warmup)")
        return terms

    def _average_gradients(self, module: nn.Module) -> None:
        """The discriminator is not wrapped in DDP (it runs twice per step); average its gradients by hand."""
        if self.dist.world > 1:
            import torch.distributed as td

            for p in module.parameters():
                if p.grad is not None:
                    td.all_reduce(p.grad)
                    p.grad /= self.dist.world

    @torch.no_grad()
    def _validate(self, vae: CausalVAE, device, autocast, step: int) -> dict[str, float]:
        """Mean PSNR/SSIM over every frame of the validation samples (posterior mode, uint8 as written)."""
        was_training = vae.training
        vae.eval()
        scores_p, scores_s, pairs = [], [], []
        for _, x in self.val:
            with autocast:
                y = vae(x[None].to(device)).float()[0].cpu()
            a, b = to_uint8(x), to_uint8(y)
            scores_p += psnr(a, b).tolist()
            if min(a.shape[-2:]) >= 11:
                scores_s += ssim(a, b).tolist()
            if len(pairs) < 4:
                pairs.append((x, y))
        vae.train(was_training)
        write_samples(self.out / f"samples-{step:06d}.png", pairs)
        return {"val_psnr": float(np.mean(scores_p)), "val_ssim": float(np.mean(scores_s)) if scores_s else None}

    def _save_checkpoint(self, step, vae, optimizer, ema, disc, d_opt, sums) -> None:
        if not self.rank0:
            return
        state = {"version": CHECKPOINT_VERSION, "step": step, "identity": self.identity,
                 "config": vae.config.to_dict(), "provenance": provenance(vae),
                 "model": vae.state_dict(), "optimizer": optimizer.state_dict(),
                 "ema": ema.state_dict() if ema is not None else None,
                 "disc": disc.state_dict() if disc is not None else None,
                 "disc_optimizer": d_opt.state_dict() if d_opt is not None else None,
                 "sums": sums}
        with atomic_path(self.out / CHECKPOINT) as tmp:
            torch.save(state, tmp)
        self._plot()

    def _plot(self) -> None:
        try:
            plot_runs([self.out], self.out / "loss.png")
        except CvaeError:
            pass  # matplotlib missing: said once at the start

    def _finish(self, vae: CausalVAE, step: int) -> Path:
        rows = read_rows(self.out / LOSS_CSV)
        last = rows[-1] if rows else {}
        val = next((r for r in reversed(rows) if r.get("val_psnr")), {})
        info = {"trained_steps": step, "train_start": self.start.describe(), "train_data": self.identity["data"],
                "train_seed": self.opts.seed, "train_loss": last.get("loss"), "val_psnr": val.get("val_psnr"),
                "val_ssim": val.get("val_ssim")}
        vae = vae.float().eval()
        save_model(vae, self.out / FINAL, **info)
        if vae.config.is_image_model:
            save_sd_vae(vae, self.out / FINAL_SD)
        self._plot()
        return self.out / FINAL


def train(opts: TrainOptions, start: Start, dist=None, report: Report | None = None) -> Path:
    """Run (or resume) a training run; returns the path of final.safetensors."""
    trainer = Trainer(opts, start, dist, report)
    trainer.prepare()
    try:
        with trainer.dist.session(trainer.dist.device(opts.device)):
            return trainer.run()
    except RuntimeError as e:
        from .budget import is_out_of_memory

        if is_out_of_memory(e):
            raise CvaeError("out of memory: try --checkpointing, a smaller --size or --batch-size") from None
        raise
