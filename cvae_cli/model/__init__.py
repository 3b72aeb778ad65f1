"""The causal video VAE as a plain PyTorch model: no files, no CLI."""
from .config import CausalVAEConfig, v1_1_0_config
from .layers import StreamCache
from .vae import CausalVAE, DiagonalGaussian

__all__ = ["CausalVAE", "CausalVAEConfig", "DiagonalGaussian", "StreamCache", "v1_1_0_config"]
