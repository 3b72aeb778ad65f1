"""The model's shape, as Open-Sora-Plan's `config.json` spells it, plus our `norm` switch."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

RESNET_BLOCKS = ("ResnetBlock3D", "ResnetBlock2D")
CONVS = ("CausalConv3d", "Conv2d")
ATTENTIONS = ("AttnBlock3D", "AttnBlock3DFix")
SPATIAL_DOWNSAMPLES = ("SpatialDownsample2x", "Downsample")
TEMPORAL_DOWNSAMPLES = ("TimeDownsample2x", "TimeDownsampleRes2x")
SPATIAL_UPSAMPLES = ("SpatialUpsample2x", "Upsample")
TEMPORAL_UPSAMPLES = ("TimeUpsample2x", "TimeUpsampleRes2x")
NORMS = ("clip", "frame")


@dataclass
class CausalVAEConfig:
    """Defaults are Open-Sora-Plan v1.0.0's `CausalVAEModel_4x8x8`.

    `norm` is ours: "clip" pools GroupNorm statistics over the whole clip (how the released
    checkpoints were trained), "frame" pools per frame (the SD image VAE; makes streaming exact).
    """

    hidden_size: int = 128
    hidden_size_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    double_z: bool = True
    dropout: float = 0.0
    attn_resolutions: tuple[int, ...] = ()
    resolution: int = 256  # only places attention when attn_resolutions is set
    in_channels: int = 3
    out_channels: int = 3
    q_conv: str = "CausalConv3d"
    encoder_conv_in: str = "CausalConv3d"
    encoder_conv_out: str = "CausalConv3d"
    encoder_attention: str = "AttnBlock3D"
    encoder_resnet_blocks: tuple[str, ...] = ("ResnetBlock3D",) * 4
    encoder_spatial_downsample: tuple[str, ...] = ("SpatialDownsample2x",) * 3 + ("",)
    encoder_temporal_downsample: tuple[str, ...] = ("TimeDownsample2x",) * 2 + ("", "")
    encoder_mid_resnet: str = "ResnetBlock3D"
    decoder_conv_in: str = "CausalConv3d"
    decoder_conv_out: str = "CausalConv3d"
    decoder_attention: str = "AttnBlock3D"
    decoder_resnet_blocks: tuple[str, ...] = ("ResnetBlock3D",) * 4
    decoder_spatial_upsample: tuple[str, ...] = ("",) + ("SpatialUpsample2x",) * 3
    decoder_temporal_upsample: tuple[str, ...] = ("", "", "TimeUpsample2x", "TimeUpsample2x")
    decoder_mid_resnet: str = "ResnetBlock3D"
    norm: str = "clip"

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                setattr(self, f.name, tuple(value))
        self.validate()

    def validate(self) -> None:
        """Refuse unknown block names and ragged per-level lists with a message that names them."""
        levels = len(self.hidden_size_mult)
        choices = {
            "q_conv": CONVS[:1], "encoder_conv_in": CONVS, "encoder_conv_out": CONVS,
            "decoder_conv_in": CONVS, "decoder_conv_out": CONVS,
            "encoder_attention": ATTENTIONS, "decoder_attention": ATTENTIONS,
            "encoder_mid_resnet": RESNET_BLOCKS, "decoder_mid_resnet": RESNET_BLOCKS,
            "encoder_resnet_blocks": RESNET_BLOCKS, "decoder_resnet_blocks": RESNET_BLOCKS,
            "encoder_spatial_downsample": SPATIAL_DOWNSAMPLES, "encoder_temporal_downsample": TEMPORAL_DOWNSAMPLES,
            "decoder_spatial_upsample": SPATIAL_UPSAMPLES, "decoder_temporal_upsample": TEMPORAL_UPSAMPLES,
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            per_level = isinstance(value, tuple)
            if per_level and len(value) != levels:
                raise ValueError(f"config field {name} has {len(value)} entries, expected {levels} "
                                 f"(one per entry of hidden_size_mult)")
            for item in value if per_level else (value,):
                if item not in allowed and not (per_level and item == "" and "Resnet" not in name):
                    raise ValueError(f"config field {name}: unknown block {item!r} (known: {', '.join(allowed)})")
        if self.norm not in NORMS:
            raise ValueError(f"config field norm must be 'clip' or 'frame', not {self.norm!r}")
        if self.hidden_size % 32:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of 32 (GroupNorm has 32 groups)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CausalVAEConfig":
        """The inverse of `to_dict`. A released config.json also carries training fields: read those
        with `checkpoints.config_from_json`."""
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples become lists."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @property
    def time_compression(self) -> int:
        return 2 ** sum(bool(b) for b in self.encoder_temporal_downsample)

    @property
    def space_compression(self) -> int:
        return 2 ** sum(bool(b) for b in self.encoder_spatial_downsample)

    @property
    def is_image_model(self) -> bool:
        """Every block sees one frame at a time: an SD-style image VAE (see `image_config`)."""
        return (self.time_compression == 1 and not any(self.decoder_temporal_upsample)
                and all(b == "ResnetBlock2D" for b in (*self.encoder_resnet_blocks, *self.decoder_resnet_blocks,
                                                       self.encoder_mid_resnet, self.decoder_mid_resnet))
                and all(c == "Conv2d" for c in (self.encoder_conv_in, self.encoder_conv_out,
                                                self.decoder_conv_in, self.decoder_conv_out))
                and all(u in ("", "Upsample") for u in self.decoder_spatial_upsample)
                and all(d in ("", "Downsample") for d in self.encoder_spatial_downsample)
                and self.norm == "frame" and self.encoder_attention == self.decoder_attention == "AttnBlock3DFix")


def image_config(**overrides: Any) -> CausalVAEConfig:
    """The SD image VAE's layout in this model's terms: every block 2-D, per-frame norm, no temporal
    resampling. Trained on images, it is what `inflate` turns into a video VAE."""
    levels = len(overrides.get("hidden_size_mult", CausalVAEConfig.hidden_size_mult))
    fields = dict(
        norm="frame", encoder_conv_in="Conv2d", encoder_conv_out="Conv2d", decoder_conv_in="Conv2d",
        decoder_conv_out="Conv2d", encoder_attention="AttnBlock3DFix", decoder_attention="AttnBlock3DFix",
        encoder_mid_resnet="ResnetBlock2D", decoder_mid_resnet="ResnetBlock2D",
        encoder_resnet_blocks=("ResnetBlock2D",) * levels, decoder_resnet_blocks=("ResnetBlock2D",) * levels,
        encoder_spatial_downsample=("Downsample",) * (levels - 1) + ("",),
        encoder_temporal_downsample=("",) * levels,
        decoder_spatial_upsample=("",) + ("Upsample",) * (levels - 1),
        decoder_temporal_upsample=("",) * levels,
    )
    fields.update(overrides)
    return CausalVAEConfig(**fields)


def v1_1_0_config(**overrides: Any) -> CausalVAEConfig:
    """Open-Sora-Plan v1.1.0's layout: 2-D first encoder levels, learned temporal resampling."""
    fields = dict(
        encoder_conv_in="Conv2d", encoder_attention="AttnBlock3DFix", decoder_attention="AttnBlock3DFix",
        encoder_resnet_blocks=("ResnetBlock2D", "ResnetBlock2D", "ResnetBlock3D", "ResnetBlock3D"),
        encoder_spatial_downsample=("Downsample", "Downsample", "Downsample", ""),
        encoder_temporal_downsample=("", "TimeDownsampleRes2x", "TimeDownsampleRes2x", ""),
        decoder_temporal_upsample=("", "", "TimeUpsampleRes2x", "TimeUpsampleRes2x"),
    )
    fields.update(overrides)
    return CausalVAEConfig(**fields)
