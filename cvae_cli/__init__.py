"""cvae: Open-Sora-Plan's causal video VAE as a library and a command-line tool."""
from .errors import CvaeError
from .model import CausalVAE, CausalVAEConfig, DiagonalGaussian

__all__ = ["CausalVAE", "CausalVAEConfig", "CvaeError", "DiagonalGaussian"]
