"""The causal video VAE as a plain PyTorch model: no files, no CLI."""
from .config import CausalVAEConfig, image_config, v1_1_0_config
from .layers import StreamCache
from .levers import Levers
from .vae import CausalVAE, DiagonalGaussian

__all__ = ["CausalVAE", "CausalVAEConfig", "DiagonalGaussian", "Levers", "StreamCache", "image_config",
           "v1_1_0_config"]
