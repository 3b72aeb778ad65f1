"""What training minimises: L1 reconstruction, KL to the unit Gaussian, and optionally LPIPS and a
3-D patch discriminator (hinge loss, adaptive weight), after Open-Sora-Plan's LPIPSWithDiscriminator3D.

Scale: Open-Sora-Plan sums the reconstruction error over pixels and the KL over latent elements,
then averages over the batch. Here both are divided by the pixel elements of a sample, so the
reported L1 is a per-pixel mean (readable) and `kl_weight` keeps Open-Sora-Plan's meaning (1e-6).
The optimum, and Adam's steps, are unchanged by that common factor.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CvaeError


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over each sample's latent elements: shape (B,)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """The generator loss's weight that gives it the reconstruction loss's gradient norm at the
    decoder's last layer (Esser et al., VQGAN), clamped to [0, 1e4], times `scale`."""
    rec_grad, = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    g_grad, = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach() * scale


class PatchDiscriminator3D(nn.Module):
    """PatchGAN in 3-D (Open-Sora-Plan's NLayerDiscriminator3D): strided convs with BatchNorm and
    LeakyReLU, one logit per space-time patch. Time kernels are 3 wide with padding 1, so a
    1-frame image and a 17-frame clip both fit."""

    def __init__(self, channels: int = 3, width: int = 64, layers: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv3d(channels, width, (3, 4, 4), stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        cin = width
        for n in range(1, layers + 1):
            cout = width * min(2 ** n, 8)
            stride = 2 if n < layers else 1
            seq += [nn.Conv3d(cin, cout, (3, 4, 4), stride=stride, padding=1, bias=False), nn.BatchNorm3d(cout),
                    nn.LeakyReLU(0.2, True)]
            cin = cout
        seq.append(nn.Conv3d(cin, 1, (3, 4, 4), stride=1, padding=1))
        self.main = nn.Sequential(*seq)
        for m in self.modules():  # the PatchGAN init: N(0, 0.02) convs, N(1, 0.02) norm scales
            if isinstance(m, nn.Conv3d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


# --- LPIPS (VGG16), from local weight files only ------------------------------------------------

_VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # features[a:b] ends after relu1_2 .. relu5_3
_VGG_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_VGG_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
    """Learned perceptual distance (Zhang et al. 2018), VGG16 variant, per frame: (B, 3, T, H, W)
    pairs in [-1, 1] -> (B,) averaged over frames. Weights cannot be downloaded here, so they come
    from local files: the `lpips` package's `vgg.pth` (its `lin0..lin4` layers) plus torchvision's
    VGG16 weights (`features.N.*`), or one file holding a whole `lpips.LPIPS` state dict."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        cin, convs = 3, iter(_VGG_WIDTHS)
        for i in range(_VGG_SLICES[-1][1]):
            if i in _VGG_CONVS:
                cout = next(convs)
                layers.append(nn.Conv2d(cin, cout, 3, padding=1))
                cin = cout
            elif i in (4, 9, 16, 23):
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(nn.ReLU(inplace=False))
        self.features = nn.Sequential(*layers)
        self.lin = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _LPIPS_CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_files(cls, paths: list[str | Path]) -> "LPIPS":
        from .checkpoints import read_state_dict

        merged: dict[str, torch.Tensor] = {}
        for p in paths:
            merged.update(read_state_dict(p))
        state = {}
        for key, value in merged.items():
            if m := re.fullmatch(r"(?:net\.slice\d\.|features\.)(\d+)\.(weight|bias)", key):
                state[f"features.{m[1]}.{m[2]}"] = value
            elif m := re.fullmatch(r"lin(\d)\.model\.1\.weight", key):
                state[f"lin.{m[1]}.weight"] = value
        model = cls()
        missing = [k for k in model.state_dict() if k not in state and k not in ("shift", "scale")]
        if missing:
            what = ("the LPIPS layers lin0..lin4 (lpips' weights/v0.1/vgg.pth)" if missing[0].startswith("lin")
                    else "the VGG16 backbone (torchvision's vgg16 weights, features.N.*)")
            raise CvaeError(f"LPIPS weights ({', '.join(map(str, paths))}) lack {what}: {len(missing)} tensors missing")
        for key, value in state.items():
            if model.state_dict()[key].shape != value.shape:
                raise CvaeError(f"LPIPS weights: {key} has shape {tuple(value.shape)}, "
                                f"expected {tuple(model.state_dict()[key].shape)}")
        model.load_state_dict(state, strict=False)
        return model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x, y = (t.transpose(1, 2).flatten(0, 1) for t in (x, y))  # every frame an image
        h = (torch.cat([x, y]) - self.shift) / self.scale
        total = 0.0
        for (a, z), lin in zip(_VGG_SLICES, self.lin):
            h = self.features[a:z](h)
            fx, fy = (f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) for f in h.chunk(2))
            total = total + lin((fx - fy).pow(2)).mean(dim=(1, 2, 3))
        return total.view(b, -1).mean(1)
