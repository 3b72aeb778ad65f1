"""Our models in and out of files: load (a released folder, a cvae .safetensors, a hub id), save
(with the config, identity and provenance in the metadata), and describe without building."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path
from ..device import dtype_named, safetensors_dtype
from ..errors import CvaeError
from ..model import CausalVAE, CausalVAEConfig
from .files import WEIGHT_FILES, one_line, read_json, read_state_dict, safetensors_metadata, weights_file
from .hub import hub_file, looks_local
from .identity import digest, record, remember_loaded
from .layouts import check_shapes, compvis_to_diffusers

FORMAT = "cvae-weights"
FORMAT_VERSION = "1"
RESERVED_METADATA = ("format", "format_version", "config", "model_id")
# What a released config.json carries besides the architecture (diffusers' own `_*` fields too).
TRAINING_ONLY = ("lr", "loss_type", "loss_params")


def config_from_json(d: dict[str, Any], where: str = "config", norm: str | None = None) -> CausalVAEConfig:
    """The architecture a config.json describes: its training fields dropped, anything else unknown refused."""
    d = {k: v for k, v in d.items() if k not in TRAINING_ONLY and not k.startswith("_")}
    d = d if norm is None else {**d, "norm": norm}
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(CausalVAEConfig)})
    if unknown:
        raise CvaeError(f"{where}: bad model config: unknown field {unknown[0]!r} (not a layout cvae builds)")
    try:
        return CausalVAEConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise CvaeError(f"{where}: bad model config: {one_line(e)}") from None



def _read_model_source(path: Path) -> tuple[dict[str, Any], Path, dict[str, str]]:
    """(config dict, weights file, provenance) of a local folder or file."""
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CvaeError(f"{path} has no config.json (a model folder holds config.json and its weights)")
        return read_json(path / "config.json"), weights_file(path), {"source": str(path)}
    if not path.exists():
        raise CvaeError(f"no such file or folder: {path}")
    meta = safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    if meta.get("format") == FORMAT:
        if meta.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise CvaeError(f"{path} has weights format_version {meta['format_version']}; "
                            f"this cvae reads {FORMAT_VERSION}: upgrade cvae")
        try:
            config = json.loads(meta.get("config", ""))
        except ValueError as e:
            raise CvaeError(f"{path} has an unreadable config in its metadata: {one_line(e)}") from None
        return config, path, {k: v for k, v in meta.items() if k not in RESERVED_METADATA}
    if (path.parent / "config.json").is_file():  # a weights file inside a released folder
        return read_json(path.parent / "config.json"), path, {"source": str(path)}
    raise CvaeError(f"{path} carries no model config (neither cvae metadata nor a config.json beside it): "
                    f"pass a file written by `cvae inflate` or a folder with config.json")


def load_model(source: str | Path, *, norm: str | None = None, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None) -> CausalVAE:
    """A ready (eval mode) CausalVAE from a folder, a cvae .safetensors or `owner/name[/subfolder]`.

    `norm` overrides the config's ("clip" in released configs). The weights are remembered as
    loaded before any dtype cast (`identity`), so a bf16 run labels its latents like an fp32 run.
    """
    where, dtype = str(source), None if dtype is None else dtype_named(dtype)
    if looks_local(where):
        config, weights, provenance = _read_model_source(Path(source))
    else:
        hint = "pass a local file or folder instead"
        config_path = hub_file(where, ("config.json",), hint)
        config, provenance = read_json(config_path), {"source": where}
        weights = hub_file(where, WEIGHT_FILES, hint)
    cfg = config_from_json(config, where, norm)
    state = {k: v for k, v in read_state_dict(weights).items() if not k.startswith("loss.")}
    with torch.device("meta"):  # no random init of weights about to be replaced
        model = CausalVAE(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_shapes(state, expected, f"{where} does not fit its config", strict=True)
    state = {k: v.float() for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    remember_loaded(model, provenance)
    return model.to(device=device, dtype=dtype).eval()


def save_model(model: CausalVAE, path: str | Path, **info: Any) -> Path:
    """One .safetensors with the config and `info` (init, source, arch, ...) in its metadata; atomic."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CvaeError(f"weights are saved as .safetensors, not {path.name}")
    extra = {**record(model).provenance, **info}
    meta = {k: str(v) for k, v in extra.items() if v is not None and k not in RESERVED_METADATA}
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # the identity of the tensors as written: what `load_model` computes when it reads them back
    meta.update(format=FORMAT, format_version=FORMAT_VERSION, config=model.config.to_json(),
                model_id=digest(model.config.to_json(), state))
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


def save_sd_vae(model: CausalVAE, path: str | Path) -> Path:
    """An image model (`CausalVAEConfig.is_image_model`) as an SD VAE file in diffusers' layout:
    what `cvae inflate --from` (and diffusers' `AutoencoderKL`) read. Atomic."""
    from safetensors.torch import save_file

    if not model.config.is_image_model:
        raise CvaeError("only an image model (every block 2-D, no temporal layers) can be written as an SD VAE")
    from ..model.layers import CausalConv3d

    wrapped = {f"{name}.conv." for name, m in model.named_modules() if isinstance(m, CausalConv3d)}
    compvis = {}
    for key, value in model.state_dict().items():
        base, leaf = key.rsplit(".", 1)
        if base + "." in wrapped:  # a 1x1x1 CausalConv3d (attention, quant convs) is a 1x1 Conv2d
            key, value = base.removesuffix(".conv") + "." + leaf, value[:, :, 0] if value.ndim == 5 else value
        compvis[key] = value.detach().to("cpu").contiguous()
    sd = compvis_to_diffusers(compvis)
    with atomic_path(Path(path)) as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt", "layout": "diffusers AutoencoderKL"})
    return Path(path)


def weights_info(path: str | Path) -> dict[str, Any]:
    """Metadata, parameter count and dtype of local weights, without building the model.

    For a .safetensors only the header is read. `config` comes back parsed (a dict).
    """
    path = Path(path)
    info: dict[str, Any] = {}
    if path.is_dir():
        info["config"] = config_from_json(read_json(path / "config.json"), str(path), None).to_dict() \
            if (path / "config.json").is_file() else None
        path = weights_file(path)
    if not path.exists():
        raise CvaeError(f"no such file or folder: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        meta = safetensors_metadata(path)
        with safe_open(str(path), "pt") as f:
            specs = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
        specs = {k: (s, safetensors_dtype(d)) for k, (s, d) in specs.items()}
        info.update(meta)
        if meta.get("format") == FORMAT and "config" in meta:
            try:
                info["config"] = json.loads(meta["config"])
            except ValueError:
                pass  # left as the string it is; `load_model` says what is wrong with it
    else:
        specs = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in read_state_dict(path).items()}
    specs = {k: v for k, v in specs.items() if not k.startswith("loss.")}
    info["file"] = str(path)
    info["tensors"] = len(specs)
    info["parameters"] = sum(_numel(s) for s, _ in specs.values())
    info["dtype"] = ", ".join(sorted({d for _, d in specs.values()}))
    return info


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
