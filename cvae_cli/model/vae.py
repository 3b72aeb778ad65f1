"""Encoder, decoder, posterior and the `CausalVAE` that ties them, keyed like Open-Sora-Plan."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from . import blocks, layers
from .config import CausalVAEConfig
from .layers import StreamCache
from .levers import Levers, compile_blocks, running
from .slices import in_slices

BLOCKS = {
    "CausalConv3d": layers.CausalConv3d, "Conv2d": layers.FrameConv2d,
    "ResnetBlock3D": blocks.ResnetBlock3D, "ResnetBlock2D": blocks.ResnetBlock2D,
    "AttnBlock3D": blocks.AttnBlock3D, "AttnBlock3DFix": blocks.AttnBlock3DFix,
    "SpatialDownsample2x": layers.SpatialDownsample2x, "Downsample": layers.Downsample,
    "SpatialUpsample2x": layers.SpatialUpsample2x, "Upsample": layers.Upsample,
    "TimeDownsample2x": layers.TimeDownsample2x, "TimeDownsampleRes2x": layers.TimeDownsampleRes2x,
    "TimeUpsample2x": layers.TimeUpsample2x, "TimeUpsampleRes2x": layers.TimeUpsampleRes2x,
}


def _resnet(name: str, cin: int, cout: int, cfg: CausalVAEConfig) -> nn.Module:
    return BLOCKS[name](cin, cout, cfg.dropout, per_frame=cfg.norm == "frame")


def _attention(name: str, channels: int, cfg: CausalVAEConfig) -> nn.Module:
    return BLOCKS[name](channels, per_frame=cfg.norm == "frame")


def _conv(name: str, cin: int, cout: int, kernel: int) -> nn.Module:
    return BLOCKS[name](cin, cout, kernel, padding=kernel // 2)


def _resample(name: str, channels: int) -> nn.Module | None:
    return BLOCKS[name](channels, channels) if name else None


class Level(nn.Module):
    """One resolution of the encoder or decoder: resnets, each followed by an attention where the
    level has them (`attn_resolutions`), then spatial and temporal resampling (either may be absent)."""

    def __init__(self, resnets: Sequence[nn.Module], attentions: Sequence[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(resnets)
        self.attn = nn.ModuleList(attentions)

    def resamplers(self) -> tuple[nn.Module | None, nn.Module | None]:
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        return [*self.block, *self.attn, *(r for r in self.resamplers() if r is not None)]

    def forward(self, h: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h, cache)
            if len(self.attn):
                h = self.attn[i](h, cache)
        for resample in self.resamplers():
            if resample is not None:
                h = resample(h, cache)
        return h


class DownLevel(Level):
    def __init__(self, resnets, attentions, downsample: nn.Module | None, time_downsample: nn.Module | None):
        super().__init__(resnets, attentions)
        self.downsample, self.time_downsample = downsample, time_downsample

    def resamplers(self):
        return self.downsample, self.time_downsample


class UpLevel(Level):
    def __init__(self, resnets, attentions, upsample: nn.Module | None, time_upsample: nn.Module | None):
        super().__init__(resnets, attentions)
        self.upsample, self.time_upsample = upsample, time_upsample

    def resamplers(self):
        return self.upsample, self.time_upsample


class Mid(nn.Module):
    def __init__(self, channels: int, cfg: CausalVAEConfig, resnet: str, attention: str):
        super().__init__()
        self.block_1 = _resnet(resnet, channels, channels, cfg)
        self.attn_1 = _attention(attention, channels, cfg)
        self.block_2 = _resnet(resnet, channels, channels, cfg)

    def forward(self, h: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        h = self.block_1(h, cache)
        h = self.attn_1(h, cache)
        return self.block_2(h, cache)

    def blocks(self) -> list[nn.Module]:
        return [self.block_1, self.attn_1, self.block_2]


class Encoder(nn.Module):
    def __init__(self, cfg: CausalVAEConfig):
        super().__init__()
        mult = (1,) + tuple(cfg.hidden_size_mult)
        self.conv_in = _conv(cfg.encoder_conv_in, cfg.in_channels, cfg.hidden_size, 3)
        self.down = nn.ModuleList()
        res = cfg.resolution
        for i in range(len(cfg.hidden_size_mult)):
            cin, cout = cfg.hidden_size * mult[i], cfg.hidden_size * mult[i + 1]
            resnets = [_resnet(cfg.encoder_resnet_blocks[i], cin if j == 0 else cout, cout, cfg)
                       for j in range(cfg.num_res_blocks)]
            attentions = [_attention(cfg.encoder_attention, cout, cfg)
                          for _ in range(cfg.num_res_blocks) if res in cfg.attn_resolutions]
            res //= 2 if cfg.encoder_spatial_downsample[i] else 1
            self.down.append(DownLevel(resnets, attentions, _resample(cfg.encoder_spatial_downsample[i], cout),
                                       _resample(cfg.encoder_temporal_downsample[i], cout)))
        width = cfg.hidden_size * mult[-1]
        self.mid = Mid(width, cfg, cfg.encoder_mid_resnet, cfg.encoder_attention)
        self.norm_out = layers.GroupNorm(width, per_frame=cfg.norm == "frame")
        self.conv_out = _conv(cfg.encoder_conv_out, width, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        h = self.conv_in(x, cache)
        for level in self.down:
            h = level(h, cache)
        h = self.mid(h, cache)
        h = self.norm_out(h)
        h = layers.silu(h)
        return self.conv_out(h, cache)

    def stages(self) -> list[nn.Module]:
        """forward's steps in order (the norm with its SiLU), for `levers.in_slices`."""
        return [self.conv_in, *self.down, self.mid, self.norm_out, self.conv_out]


class Decoder(nn.Module):
    def __init__(self, cfg: CausalVAEConfig):
        super().__init__()
        levels = len(cfg.hidden_size_mult)
        width = cfg.hidden_size * cfg.hidden_size_mult[-1]
        res = cfg.resolution // 2 ** (levels - 1)
        self.conv_in = _conv(cfg.decoder_conv_in, cfg.z_channels, width, 3)
        self.mid = Mid(width, cfg, cfg.decoder_mid_resnet, cfg.decoder_attention)
        up = []
        for i in reversed(range(levels)):
            cout = cfg.hidden_size * cfg.hidden_size_mult[i]
            resnets = [_resnet(cfg.decoder_resnet_blocks[i], width if j == 0 else cout, cout, cfg)
                       for j in range(cfg.num_res_blocks + 1)]
            attentions = [_attention(cfg.decoder_attention, cout, cfg)
                          for _ in range(cfg.num_res_blocks + 1) if res in cfg.attn_resolutions]
            res *= 2 if cfg.decoder_spatial_upsample[i] else 1
            up.insert(0, UpLevel(resnets, attentions, _resample(cfg.decoder_spatial_upsample[i], cout),
                                 _resample(cfg.decoder_temporal_upsample[i], cout)))
            width = cout
        self.up = nn.ModuleList(up)
        self.norm_out = layers.GroupNorm(width, per_frame=cfg.norm == "frame")
        self.conv_out = _conv(cfg.decoder_conv_out, width, cfg.out_channels, 3)

    def forward(self, z: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        """Streaming, a step may hold every frame back for look-ahead (and return none), and the
        last step may carry no latent at all (T = 0): it only releases what was held back."""
        h = self.conv_in(z, cache)
        h = self.mid(h, cache)
        for level in reversed(self.up):
            h = level(h, cache)
        h = self.norm_out(h)
        h = layers.silu(h)
        return self.conv_out(h, cache)

    def stages(self) -> list[nn.Module]:
        """forward's steps in order (the norm with its SiLU), for `levers.in_slices`."""
        return [self.conv_in, self.mid, *reversed(self.up), self.norm_out, self.conv_out]


@dataclass
class DiagonalGaussian:
    """The encoder's posterior over latents; `mode()` is what a tokenizer normally stores."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> "DiagonalGaussian":
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar.clamp(-30.0, 20.0))

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None, *, seed: int | None = None,
               first_frame: int = 0) -> torch.Tensor:
        """mean + std * noise. With `seed`, the noise of latent frame t depends only on
        (seed, first_frame + t), not on how the clip was cut: a video sampled chunk by chunk gets
        the sample it would get whole (rows of a batch share it)."""
        if seed is None:
            noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype,
                                device=generator.device if generator is not None else self.mean.device)
        else:
            b, c, t, h, w = self.mean.shape
            noise = torch.stack([torch.randn((b, c, h, w), generator=torch.Generator().manual_seed(
                _frame_seed(seed, first_frame + i))) for i in range(t)], dim=2)
        return self.mean + self.std * noise.to(self.mean.device, self.mean.dtype)


def _frame_seed(seed: int, frame: int) -> int:
    """A well-mixed 63-bit seed for one latent frame of a seeded sample."""
    digest = hashlib.blake2b(f"{seed}:{frame}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class CausalVAE(nn.Module):
    """Open-Sora-Plan's `CausalVAEModel`: its state_dict keys and shapes, its arithmetic.

    Clips are (B, 3, T, H, W) in [-1, 1] with T = 1 + 4k and H, W multiples of 8 (for the released
    4x8x8 layout); an image is a 1-frame clip. Pass a `StreamCache` to feed a clip in chunks.
    """

    def __init__(self, config: CausalVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        q = layers.CausalConv3d
        self.quant_conv = q(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = q(config.embed_dim, config.z_channels, 1)
        self.levers = Levers()

    def use_levers(self, levers: Levers) -> "CausalVAE":
        """The speed-ups in force while this model encodes and decodes (`levers.Levers`); returns
        the model. Turning `compile` on compiles its blocks in place: copy a model before, not after."""
        if levers.compile != self.levers.compile:
            compile_blocks(self, levers.compile)
        self.levers = levers
        return self

    def blocks(self) -> Iterator[nn.Module]:
        """The units that `Levers.compile` compiles one by one, in the order they run."""
        for part in (self.encoder, self.decoder):
            for stage in part.stages():
                if isinstance(stage, (Level, Mid)):
                    yield from stage.blocks()
                elif not isinstance(stage, layers.GroupNorm):  # the output norm: fused or not, no block
                    yield stage

    @classmethod
    def from_pretrained(cls, source: str, **kwargs) -> "CausalVAE":
        """Load from a folder, a cvae `.safetensors` or a hub repo id (see `cvae_cli.checkpoints`)."""
        from ..checkpoints import load_model  # files and the hub live outside the model

        return load_model(source, **kwargs)

    def encode(self, x: torch.Tensor, cache: StreamCache | None = None) -> DiagonalGaussian:
        self._check_pixels(x, first=cache is None or not cache.state)
        with running(self.levers, cache):
            h = in_slices(self.encoder, x, cache, self.levers.slice_elements, leading=True)
            return DiagonalGaussian.from_moments(self.quant_conv(h, cache))

    def decode(self, z: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        if z.ndim != 5 or z.shape[1] != self.config.embed_dim:
            raise ValueError(f"latents must be (B, {self.config.embed_dim}, T, H, W), got {tuple(z.shape)}")
        with running(self.levers, cache):
            h = self.post_quant_conv(z, cache)
            return in_slices(self.decoder, h, cache, self.levers.slice_elements, leading=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x).mode())

    def _check_pixels(self, x: torch.Tensor, first: bool) -> None:
        cfg, ft, fs = self.config, self.config.time_compression, self.config.space_compression
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"pixels must be (B, {cfg.in_channels}, T, H, W), got {tuple(x.shape)}; "
                             f"an image is a clip with T = 1")
        t, h, w = x.shape[2:]
        if first and (t - 1) % ft:
            raise ValueError(f"frame count must be 1 + {ft}k (got {t}): pad by repeating the last frame")
        if not first and t % ft:
            raise ValueError(f"a continuing chunk must hold a multiple of {ft} frames (got {t})")
        if h % fs or w % fs:
            raise ValueError(f"height and width must be multiples of {fs} (got {h}x{w}): pad the edges")
