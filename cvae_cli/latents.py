"""Latent files: a `.safetensors` with the latent (C, T', H', W'), optionally its log-variance,
and versioned string metadata that says everything decode needs (SPEC §5).

The stored latent is the raw posterior (mean, or a sample when `sampled`), *not* multiplied by
`scaling_factor`; the factor is recorded for diffusion users. Writing streams: chunks go to a raw
temporary file as they are produced and the safetensors file is assembled at close, one channel
block at a time, so memory never holds the whole latent. The final file appears atomically.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .atomic import atomic_path, remove_stale, temp_beside
from .device import DTYPES
from .errors import CvaeError
from .model.config import CausalVAEConfig

FORMAT_VERSION = 1
DEFAULT_SCALING_FACTOR = 0.18215
_PREFIX = "cvae."
_COPY_BLOCK_BYTES = 64 << 20  # bytes copied per write when assembling the file

# stored dtype -> (safetensors dtype tag, numpy dtype holding the same bytes)
_STORAGE = {
    "float32": ("F32", np.float32),
    "float16": ("F16", np.float16),
    "bfloat16": ("BF16", np.uint16),  # numpy has no bf16: move raw bits
}


def _format_fps(fps: Fraction | None) -> str:
    return "" if fps is None else f"{fps.numerator}/{fps.denominator}"


def _parse_fps(s: str) -> Fraction | None:
    return None if s == "" else Fraction(s)


def _format_times(times) -> str:
    """Times as integer ticks of one exact unit: `1/90000:0,3003,6006`."""
    unit = math.lcm(*(Fraction(t).denominator for t in times))
    return f"1/{unit}:" + ",".join(str(int(Fraction(t) * unit)) for t in times)


def _parse_times(s: str) -> tuple[Fraction, ...]:
    unit, sep, ticks = s.partition(":")
    if not sep or not unit.startswith("1/"):
        raise ValueError(s)
    unit = Fraction(unit)
    return tuple(int(t) * unit for t in ticks.split(",")) if ticks else ()


def _parse_bool(s: str) -> bool:
    if s not in ("true", "false"):
        raise ValueError(s)
    return s == "true"


def _parse_dtype(s: str) -> str:
    if s not in _STORAGE:
        raise ValueError(s)
    return s


@dataclass
class LatentMeta:
    """What a latent file says about itself; every field is stored as a string `cvae.<field>`."""

    model_id: str  # identity of the weights (e.g. a hash); decode checks it against its own
    model_config: str  # JSON of the model config, enough to rebuild the architecture
    frames: int  # original frame count, before padding
    height: int
    width: int
    padded_frames: int  # what the model saw: edges repeated at the end / right / bottom
    padded_height: int
    padded_width: int
    fps: Fraction | None  # None for a still image
    source: str  # input file name
    dtype: str = "float32"  # of the stored tensors: float32, float16 or bfloat16
    scaling_factor: float = DEFAULT_SCALING_FACTOR
    sampled: bool = False  # posterior sample (True) or mean (False)
    format_version: int = FORMAT_VERSION
    # a variable frame rate's presentation times, seconds from the first frame (None: 1/fps apart);
    # optional in files, since a constant rate needs none
    frame_times: tuple[Fraction, ...] | None = None

    _PARSERS = {"frames": int, "height": int, "width": int, "padded_frames": int,
                "padded_height": int, "padded_width": int, "format_version": int,
                "fps": _parse_fps, "scaling_factor": float, "sampled": _parse_bool, "dtype": _parse_dtype,
                "frame_times": _parse_times}
    _OPTIONAL = {"frame_times"}

    def to_metadata(self) -> dict[str, str]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "fps":
                s = _format_fps(v)
            elif f.name == "frame_times":
                if v is None:
                    continue
                s = _format_times(v)
            elif isinstance(v, bool):
                s = "true" if v else "false"
            elif isinstance(v, float):
                s = repr(v)
            else:
                s = str(v)
            out[_PREFIX + f.name] = s
        return out

    @classmethod
    def from_metadata(cls, metadata: dict[str, str] | None, where: str = "latent file") -> LatentMeta:
        md = metadata or {}
        version = md.get(_PREFIX + "format_version")
        if version is None or not version.isdigit():
            raise CvaeError(f"{where} is not a cvae latent file")
        if int(version) != FORMAT_VERSION:
            raise CvaeError(f"{where}: latent format version {version} is not supported "
                            f"(this cvae reads {FORMAT_VERSION})")
        values = {}
        for f in dataclasses.fields(cls):
            key = _PREFIX + f.name
            if key not in md and f.name in cls._OPTIONAL:
                continue
            if key not in md:
                raise CvaeError(f"{where} is not a cvae latent file (metadata {key} is missing)")
            try:
                values[f.name] = cls._PARSERS.get(f.name, str)(md[key])
            except (ValueError, ZeroDivisionError):
                raise CvaeError(f"{where} is not a cvae latent file "
                                f"(metadata {key} = {md[key]!r} is invalid)") from None
        return cls(**values)

    def config(self, where: str = "latent file") -> CausalVAEConfig:
        """The config of the model that made the latent."""
        try:
            return CausalVAEConfig.from_dict(json.loads(self.model_config))
        except (ValueError, TypeError, AttributeError):
            raise CvaeError(f"{where} is not a cvae latent file (metadata cvae.model_config is invalid)") from None

    @property
    def latent_channels(self) -> int:
        """The config's `embed_dim` (4 for every released model)."""
        return self.config().embed_dim

    def latent_shape(self, where: str = "latent file") -> tuple[int, int, int, int]:
        """The (C, T', H', W') this metadata describes; CvaeError when its fields disagree."""
        cfg = self.config(where)
        ft, fs = cfg.time_compression, cfg.space_compression
        padded = (1 + ft * math.ceil(max(self.frames - 1, 0) / ft), fs * math.ceil(self.height / fs),
                  fs * math.ceil(self.width / fs))
        if min(self.frames, self.height, self.width) < 1 or \
                (self.padded_frames, self.padded_height, self.padded_width) != padded:
            raise CvaeError(f"{where}: its metadata disagrees with itself ({self.frames} frames of "
                            f"{self.width}x{self.height} pad to {padded[0]} of {padded[2]}x{padded[1]}, not "
                            f"{self.padded_frames} of {self.padded_width}x{self.padded_height})")
        if self.frame_times is not None and len(self.frame_times) != self.frames:
            raise CvaeError(f"{where}: it lists {len(self.frame_times)} frame times for {self.frames} frames")
        return cfg.embed_dim, (padded[0] - 1) // ft + 1, padded[1] // fs, padded[2] // fs


def _latent_interface(config: CausalVAEConfig) -> dict[str, int]:
    """What a latent must agree on with the model that decodes it: its channels and how many
    frames and pixels each latent stands for."""
    return {"latent channels": config.embed_dim, "time compression": config.time_compression,
            "space compression": config.space_compression}


def check_compatible(meta: LatentMeta, model_id: str, config: CausalVAEConfig | None = None,
                     where: str = "latent file", force: bool = False) -> None:
    """Raise when the latent was made by other weights (unless `force`), and always when it was
    made by a model whose latents mean other sizes or channels (it would decode to the wrong
    size, or not at all)."""
    if config is not None:
        ours, theirs = _latent_interface(config), _latent_interface(meta.config(where))
        differ = [f"{k} {theirs[k]}, not {ours[k]}" for k in ours if ours[k] != theirs[k]]
        if differ:
            raise CvaeError(f"{where} was encoded by another architecture ({'; '.join(differ)}): pass the "
                            "--weights that made it (--force cannot decode it)")
    if meta.model_id != model_id and not force:
        raise CvaeError(f"{where} was encoded with weights {meta.model_id}, but the loaded weights "
                        f"are {model_id} (pass --weights for the matching ones, or --force)")


class LatentWriter:
    """Append latent chunks (C, t, H', W') as they come; `close()` assembles the file atomically.

    Chunks go to raw temporary files (frame-major, beside the target so a long video's latents
    land on the target's disk, not in /tmp); on any exception inside `with`, both the raw files and
    the half-made output are removed and nothing appears at `path`.
    """

    def __init__(self, path: str | os.PathLike, meta: LatentMeta, with_logvar: bool = False):
        if sys.byteorder != "little":
            raise CvaeError("writing latent files needs a little-endian machine")
        if meta.dtype not in _STORAGE:
            raise ValueError(f"unsupported latent dtype {meta.dtype!r}")
        self.path, self.meta = Path(path), meta
        self.names = ("latent", "logvar") if with_logvar else ("latent",)
        self._torch_dtype = DTYPES[meta.dtype]
        self._tag, self._np_dtype = _STORAGE[meta.dtype]
        self._chw: tuple[int, int, int] | None = None
        self.frames = 0
        self._raw: dict[str, tuple[Path, object]] = {}
        remove_stale(self.path)  # what a killed writer of this output left
        try:
            for name in self.names:
                self._raw[name] = temp_beside(self.path, f"{name}.raw")
        except CvaeError:
            self.abort()
            raise

    def append(self, latent: torch.Tensor, logvar: torch.Tensor | None = None) -> None:
        if (logvar is not None) != ("logvar" in self.names):
            raise ValueError("pass logvar chunks exactly when the writer was made with_logvar=True")
        if latent.ndim != 4 or (self._chw is not None and
                                (latent.shape[0], *latent.shape[2:]) != self._chw):
            raise ValueError(f"latent chunk of shape {tuple(latent.shape)} does not continue "
                             f"(C, t, H', W') = {self._chw}")
        if logvar is not None and logvar.shape != latent.shape:
            raise ValueError(f"logvar chunk {tuple(logvar.shape)} != latent chunk {tuple(latent.shape)}")
        self._chw = (latent.shape[0], *latent.shape[2:])
        for name, t in zip(self.names, (latent, logvar)):
            t = t.detach().to("cpu", self._torch_dtype).permute(1, 0, 2, 3).contiguous()
            if t.dtype == torch.bfloat16:
                t = t.view(torch.int16)
            self._raw[name][1].write(memoryview(t.numpy()).cast("B"))
        self.frames += latent.shape[1]

    def close(self) -> None:
        """Write `path` from the raw files and remove them (a second call does nothing)."""
        if not self._raw:
            return
        try:
            if self._chw is None:
                raise CvaeError(f"{self.path}: no latent frames to write")
            for _, f in self._raw.values():
                f.close()
            c, h, w = self._chw
            t = self.frames
            itemsize = np.dtype(self._np_dtype).itemsize
            nbytes = c * t * h * w * itemsize
            header: dict = {"__metadata__": self.meta.to_metadata()}
            for i, name in enumerate(self.names):
                header[name] = {"dtype": self._tag, "shape": [c, t, h, w],
                                "data_offsets": [i * nbytes, (i + 1) * nbytes]}
            hb = json.dumps(header, separators=(",", ":")).encode()
            hb += b" " * (-len(hb) % 8)  # keep the data 8-byte aligned, as safetensors does
            block = max(1, _COPY_BLOCK_BYTES // (c * h * w * itemsize))  # frames mapped at once
            with atomic_path(self.path) as tmp, open(tmp, "wb") as out:
                out.write(struct.pack("<Q", len(hb)) + hb)
                for name in self.names:  # (T, C, H, W) on disk -> (C, T, H, W) in the file
                    for ch in range(c):
                        for t0 in range(0, t, block):  # map one window at a time: bounded RSS
                            n = min(block, t - t0)
                            mm = np.memmap(self._raw[name][0], dtype=self._np_dtype, mode="r",
                                           offset=t0 * c * h * w * itemsize, shape=(n, c, h, w))
                            out.write(np.ascontiguousarray(mm[:, ch]).data)
                            del mm
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop everything written so far (the raw files); `path` is left untouched."""
        for tmp, f in self._raw.values():
            f.close()
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._raw = {}

    def __enter__(self) -> LatentWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _open_safetensors(path: Path):
    """A memory-mapped safetensors handle (no file descriptor stays open)."""
    if not path.exists():
        raise CvaeError(f"{path} does not exist")
    try:
        from safetensors import safe_open
        return safe_open(str(path), framework="pt")
    except Exception as e:  # SafetensorError, OSError, ...: say what the library said
        raise CvaeError(f"{path} is not a readable safetensors file: {e}") from None


class _InMemory:
    """A safetensors file's bytes, answering what `LatentFile` asks of a `safe_open` handle."""

    def __init__(self, data: bytes, where: str):
        try:
            from safetensors.torch import load

            self._tensors = load(bytes(data))
            (size,) = struct.unpack("<Q", data[:8])
            self._metadata = json.loads(bytes(data[8:8 + size])).get("__metadata__")
        except Exception as e:  # SafetensorError, struct.error, ValueError: say what was found
            raise CvaeError(f"{where} is not a readable safetensors file: {e}") from None

    def metadata(self) -> dict[str, str] | None:
        return self._metadata

    def keys(self) -> list[str]:
        return list(self._tensors)

    def get_slice(self, name: str) -> "_TensorSlice":
        return _TensorSlice(self._tensors[name])


class _TensorSlice:
    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def get_shape(self) -> list[int]:
        return list(self.tensor.shape)

    def __getitem__(self, index) -> torch.Tensor:
        return self.tensor[index]


class LatentFile:
    """An opened latent file: metadata and shapes are read and checked against each other on
    opening, tensors on request, from the same memory map. Pass it along rather than its path."""

    def __init__(self, path: Path, meta: LatentMeta, shape: tuple[int, int, int, int], has_logvar: bool, handle):
        self.path, self.meta, self.shape, self.has_logvar = path, meta, shape, has_logvar
        self._handle = handle

    @classmethod
    def open(cls, path: str | os.PathLike) -> LatentFile:
        """CvaeError unless `path` is a cvae latent file whose tensors have the shape its
        metadata describes (a file that says 96x128 but holds 80x80 latents is refused)."""
        path = Path(path)
        return cls._checked(path, _open_safetensors(path))

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "latent file") -> LatentFile:
        """A latent file held in memory (a member of a tar shard), checked as `open` checks a file;
        `where` names it in messages."""
        return cls._checked(Path(where), _InMemory(data, where))

    @classmethod
    def _checked(cls, path: Path, f) -> LatentFile:
        meta = LatentMeta.from_metadata(f.metadata(), where=str(path))
        keys = set(f.keys())
        if "latent" not in keys:
            raise CvaeError(f"{path} has no 'latent' tensor")
        shape = tuple(f.get_slice("latent").get_shape())
        if len(shape) != 4:
            raise CvaeError(f"{path}: 'latent' has shape {shape}, expected (C, T, H, W)")
        expected = meta.latent_shape(str(path))
        if shape[0] != expected[0]:
            raise CvaeError(f"{path}: 'latent' has {shape[0]} channels, expected {expected[0]}")
        if shape != expected:
            raise CvaeError(f"{path}: 'latent' has shape {shape}, but its metadata ({meta.frames} frames of "
                            f"{meta.width}x{meta.height}) needs {expected}")
        has_logvar = "logvar" in keys
        if has_logvar and tuple(f.get_slice("logvar").get_shape()) != shape:
            raise CvaeError(f"{path}: 'logvar' and 'latent' have different shapes")
        return cls(path, meta, shape, has_logvar, f)

    @property
    def frames(self) -> int:
        """Latent frames T'."""
        return self.shape[1]

    def _check(self, tensor: str) -> None:
        if tensor not in (("latent", "logvar") if self.has_logvar else ("latent",)):
            raise CvaeError(f"{self.path} has no {tensor!r} tensor")

    def read(self, dtype: torch.dtype = torch.float32, tensor: str = "latent") -> torch.Tensor:
        """The whole tensor (C, T', H', W'); for long videos prefer `iter_chunks`."""
        return torch.cat(list(self.iter_chunks(max(1, self.frames), dtype, tensor)), dim=1)

    def iter_chunks(self, frames_per_chunk: int, dtype: torch.dtype = torch.float32,
                    tensor: str = "latent") -> Iterator[torch.Tensor]:
        """Yield (C, t, H', W') slices of at most `frames_per_chunk` latent frames, in order;
        CvaeError at a slice holding NaN or infinite values (which would decode to black)."""
        if frames_per_chunk < 1:
            raise ValueError("frames_per_chunk must be >= 1")
        self._check(tensor)
        sl = self._handle.get_slice(tensor)
        for t0 in range(0, self.frames, frames_per_chunk):
            chunk = sl[:, t0:t0 + frames_per_chunk]
            if not torch.isfinite(chunk).all():
                raise CvaeError(f"{self.path}: '{tensor}' holds NaN or infinite values (latent frames "
                                f"{t0}..{t0 + chunk.shape[1] - 1}): the file is damaged")
            yield chunk.to(dtype)

    def close(self) -> None:
        self._handle = None

    def __enter__(self) -> LatentFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def save(path: str | os.PathLike, latent: torch.Tensor, meta: LatentMeta,
             logvar: torch.Tensor | None = None) -> LatentFile:
        """Write a small in-memory latent (C, T', H', W') in one go."""
        with LatentWriter(path, meta, with_logvar=logvar is not None) as w:
            w.append(latent, logvar)
        return LatentFile.open(path)
