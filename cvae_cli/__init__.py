"""cvae: Open-Sora-Plan's causal video VAE as a library and a command-line tool.

The model and `inflate` import eagerly; file-level pieces (media, latents, checkpoints, ...) load on
first use. Every public name means one thing: `cvae_cli.inflate` is the function, whichever
submodule was imported before (Python binds a submodule to its package's attribute when it is
first imported, so a lazily looked-up function of the same name would lose to the module).
"""
from importlib import import_module

from .errors import CvaeError
from .inflate import inflate  # after `import .inflate` has bound the module here, so the function wins
from .model import CausalVAE, CausalVAEConfig, DiagonalGaussian, StreamCache

_LAZY = {
    "load_model": "checkpoints", "save_model": "checkpoints",
    "LatentFile": "latents", "LatentMeta": "latents", "LatentWriter": "latents",
    "StreamOptions": "stream", "choose_options": "stream", "encode_frames": "stream", "decode_latents": "stream",
    "open_media": "media", "MediaFile": "media", "MediaInfo": "media",
    "Tokenizer": "tokenizer", "Selection": "selection",
    "encode_file": "convert", "encode_many": "convert", "decode_file": "convert", "reconstruct_file": "convert",
    "read_manifest": "dataset", "DatasetJob": "dataset", "Dist": "distributed",
    "psnr": "metrics", "ssim": "metrics", "LatentDataset": "loader",
}

__all__ = ["CausalVAE", "CausalVAEConfig", "CvaeError", "DiagonalGaussian", "StreamCache", "inflate", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'cvae_cli' has no attribute {name!r}")
