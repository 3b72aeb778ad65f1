"""Weights in and out: file formats, foreign layouts, the Hugging Face hub.

Three kinds of weights reach this tool:
- Open-Sora-Plan's released video VAE: a folder (config.json + diffusion_pytorch_model.safetensors),
  locally or as `owner/name/subfolder` on the hub. Its keys are already ours; `loss.*` is dropped.
- Our own single-file `.safetensors` (written by `save_model`): the config travels in its metadata.
- The SD image VAE to inflate, in the diffusers or the CompVis layout; `sd_vae_to_compvis` is the
  one place that maps its names, so `inflate.py` only ever sees CompVis names.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_path
from .device import dtype_named
from .errors import CvaeError
from .model import CausalVAE, CausalVAEConfig

FORMAT = "cvae-weights"
FORMAT_VERSION = "1"
RESERVED_METADATA = ("format", "format_version", "config", "model_id")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "pytorch_model.bin", "model.safetensors")
SD_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DEFAULT_SD_VAE = "stabilityai/sd-vae-ft-mse"
_LOCAL_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".json")
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
# What a released config.json carries besides the architecture (diffusers' own `_*` fields too).
TRAINING_ONLY = ("lr", "loss_type", "loss_params")


def _one_line(e: BaseException) -> str:
    """The first line of an exception's message, for errors that must fit on one line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# --- reading files ----------------------------------------------------------------------------

def _weights_file(folder: Path, names: tuple[str, ...] = WEIGHT_FILES) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise CvaeError(f"{folder} holds no weights file (looked for {', '.join(names)})")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors, .bin, .ckpt or .pt file (or a diffusers folder), on the CPU.

    Pickles are read with `weights_only=True`: a checkpoint cannot run code on this machine.
    """
    path = Path(path)
    if path.is_dir():
        path = _weights_file(path)
    if not path.exists():
        raise CvaeError(f"no such file: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign, pickled objects...: the user gave a bad file
        kind = "safetensors" if path.suffix == ".safetensors" else "a PyTorch checkpoint of tensors"
        raise CvaeError(f"{path} is not a readable weights file (expected {kind}): {_one_line(e)}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):  # Lightning / SD .ckpt
        sd = sd["state_dict"]
    tensors = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)} \
        if isinstance(sd, dict) else {}
    if not tensors:
        raise CvaeError(f"{path} is not a readable weights file: it holds no named tensors")
    return tensors


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise CvaeError(f"{path} is not a readable weights file: {_one_line(e)}") from None


# --- the SD image VAE: diffusers -> CompVis names ----------------------------------------------

# diffusers name -> CompVis name; the decoder's up_blocks run in the opposite order (see below).
_DIFFUSERS_RENAMES = [
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1."),
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
]
# Inside the attention: current diffusers names, then the old (< 0.15) ones.
_ATTENTION_RENAMES = [(r"\.group_norm\.", ".norm."), (r"\.(to_q|query)\.", ".q."), (r"\.(to_k|key)\.", ".k."),
                      (r"\.(to_v|value)\.", ".v."), (r"\.(to_out\.0|proj_attn)\.", ".proj_out.")]
_VAE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def _diffusers_to_compvis(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ups = 1 + max((int(m[1]) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))), default=-1)
    out = {}
    for key, value in sd.items():
        key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.",
                     lambda m: f"decoder.up.{ups - 1 - int(m[1])}.block.", key)
        key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{ups - 1 - int(m[1])}.upsample.", key)
        for pattern, repl in _DIFFUSERS_RENAMES:
            key = re.sub(pattern, repl, key)
        if ".mid.attn_1." in key:
            for pattern, repl in _ATTENTION_RENAMES:
                key = re.sub(pattern, repl, key)
            if key.endswith(".weight") and value.ndim == 2:  # Linear (C, C) -> 1x1 conv
                value = value[:, :, None, None]
        out[key] = value
    return out


def compvis_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CompVis names -> diffusers' `AutoencoderKL` names: the inverse of `_diffusers_to_compvis`."""
    ups = 1 + max((int(m[1]) for k in sd if (m := re.match(r"decoder\.up\.(\d+)\.", k))), default=-1)
    renames = [(r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
               (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
               (r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
               (r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
               (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
               (r"\.nin_shortcut\.", ".conv_shortcut.")]
    attention = [(r"\.attn_1\.norm\.", ".attn_1.group_norm."), (r"\.attn_1\.q\.", ".attn_1.to_q."),
                 (r"\.attn_1\.k\.", ".attn_1.to_k."), (r"\.attn_1\.v\.", ".attn_1.to_v."),
                 (r"\.attn_1\.proj_out\.", ".attn_1.to_out.0.")]
    out = {}
    for key, value in sd.items():
        if ".mid.attn_1." in key:
            for pattern, repl in attention:
                key = re.sub(pattern, repl, key)
            if key.endswith(".weight") and value.ndim == 4:  # 1x1 conv -> Linear (C, C)
                value = value[:, :, 0, 0]
            key = key.replace(".mid.attn_1.", ".mid_block.attentions.0.")
        key = re.sub(r"^decoder\.up\.(\d+)\.block\.",
                     lambda m: f"decoder.up_blocks.{ups - 1 - int(m[1])}.resnets.", key)
        key = re.sub(r"^decoder\.up\.(\d+)\.upsample\.",
                     lambda m: f"decoder.up_blocks.{ups - 1 - int(m[1])}.upsamplers.0.", key)
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def sd_vae_config(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Widths and depth of a CompVis-named SD VAE, read off its tensor shapes."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            hint = (" (this is a video VAE checkpoint; it needs no inflating: load it as weights)"
                    if "encoder.conv_in.conv.weight" in sd else "")
            raise CvaeError(f"not an SD VAE state dict: missing {key}{hint}")
        if sd[key].ndim != 4:
            raise CvaeError(f"not an SD VAE state dict: unexpected shape for {key}: {tuple(sd[key].shape)}")
        return tuple(sd[key].shape)

    ch, cin = shape("encoder.conv_in.weight")[:2]
    levels = max(1, sum(1 for k in sd if re.fullmatch(r"encoder\.down\.\d+\.block\.0\.conv1\.weight", k)))
    return dict(
        hidden_size=ch, in_channels=cin,
        hidden_size_mult=tuple(max(1, shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch)
                               for i in range(levels)),
        num_res_blocks=max(1, sum(1 for k in sd if re.fullmatch(r"encoder\.down\.0\.block\.\d+\.conv1\.weight", k))),
        z_channels=shape("encoder.conv_out.weight")[0] // 2,  # double_z: mean and logvar
        embed_dim=shape("quant_conv.weight")[0] // 2,
        out_channels=shape("decoder.conv_out.weight")[0],
    )


def sd_vae_to_compvis(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An SD image VAE in either layout (or inside a full SD checkpoint) -> CompVis names.

    Non-VAE keys (the UNet, the text encoder, `loss.*`) are dropped. Whether every tensor is there
    with the right shape is checked against the model built from it (`inflate.check_image_vae`).
    """
    sd = dict(state_dict)
    for prefix in ("first_stage_model.", "vae."):  # a full SD checkpoint carries the VAE under one
        if any(k.startswith(prefix + "encoder.") for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    sd = {k: v for k, v in sd.items() if k.startswith(_VAE_PREFIXES)}
    if any(".down_blocks." in k or ".mid_block." in k or ".up_blocks." in k for k in sd):
        sd = _diffusers_to_compvis(sd)
    return sd


def check_shapes(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], problem: str,
                 strict: bool = False) -> None:
    """Name the first missing, misshapen (or, if `strict`, unexpected) tensor in a one-line error."""
    for key, shape in expected.items():
        if key not in state:
            raise CvaeError(f"{problem}: missing {key}")
        if tuple(state[key].shape) != shape:
            raise CvaeError(f"{problem}: unexpected shape for {key}: {tuple(state[key].shape)} (expected {shape})")
    for key in state if strict else ():
        if key not in expected:
            raise CvaeError(f"{problem}: unexpected weight {key}")


# --- the hub ----------------------------------------------------------------------------------

def _looks_local(source: str) -> bool:
    """A path (existing or meant to be one) rather than `owner/name[/subfolder]` on the hub."""
    return (Path(source).exists() or source.startswith(("/", ".", "~")) or "\\" in source
            or source.endswith(_LOCAL_SUFFIXES) or source.count("/") < 1)


def _split_repo(source: str) -> tuple[str, str | None]:
    parts = source.strip("/").split("/")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None


def _hub_file(source: str, names: tuple[str, ...], hint: str) -> Path:
    """The first of `names` in hub repo `owner/name[/subfolder]`: from the local cache when it is
    there (no network asked), else downloaded after one quick check, retries off, that the hub
    answers at all, so that no network means one line within seconds, not a minute of retries."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo, sub = _split_repo(source)
    for name in names:
        try:
            return Path(hf_hub_download(repo, name, subfolder=sub, local_files_only=True))
        except (LocalEntryNotFoundError, EntryNotFoundError):
            continue
        except ValueError as e:  # HFValidationError: not a repo id at all
            raise CvaeError(f"{source} is neither a local path nor a Hugging Face repo id: {_one_line(e)}") from None
    if constants.HF_HUB_OFFLINE:
        raise CvaeError(f"cannot download {source} from the Hugging Face hub (offline and not in the cache): {hint}")
    _check_hub_answers(source, hint)
    for name in names:
        try:
            with _hub_logging_quiet():
                return Path(hf_hub_download(repo, name, subfolder=sub))
        except LocalEntryNotFoundError:  # the connection went away after the check
            raise CvaeError(f"cannot download {source} from the Hugging Face hub (no answer): {hint}") from None
        except EntryNotFoundError:  # the repo exists but has no such file
            continue
        except RepositoryNotFoundError:
            raise CvaeError(f"no repository {repo} on the Hugging Face hub (or it is private or gated: "
                            f"log in with `hf auth login`)") from None
        except Exception as e:  # HTTP errors, connection errors of requests or httpx, disk full...
            raise CvaeError(f"cannot download {source} from the Hugging Face hub: {_one_line(e)}") from None
    tip = f" (Open-Sora-Plan keeps its VAE in a subfolder: try {repo}/vae)" if sub is None else ""
    raise CvaeError(f"{source} on the Hugging Face hub has none of {', '.join(names)}{tip}")


def _check_hub_answers(source: str, hint: str, timeout_s: float = 5.0) -> None:
    """One request to the hub's endpoint, no retries: CvaeError when there is no answer at all
    (no network, no DNS, a firewall). Any HTTP answer, even an error, means the hub is reachable."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout_s)
    except Exception as e:
        raise CvaeError(f"cannot reach the Hugging Face hub ({constants.ENDPOINT}: {_one_line(e)}) and {source} "
                        f"is not in the local cache: {hint}") from None


@contextlib.contextmanager
def _hub_logging_quiet():
    """huggingface-hub logs each retry of a download; one clear line at the end says enough."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def fetch_sd_vae(source: str | Path | None = None) -> Path:
    """The SD image VAE's weights file: a local path as is, else from the hub (default sd-vae-ft-mse)."""
    source = str(source or DEFAULT_SD_VAE)
    if _looks_local(source):
        if not Path(source).exists():
            raise CvaeError(f"no such file: {source}")
        return Path(source)
    return _hub_file(source, SD_WEIGHT_FILES, "pass a local file with --from PATH instead")


# --- where weights live when nobody says ------------------------------------------------------

BUILTIN_WEIGHTS = "cvae-small.safetensors"  # shipped in the package (`weights/` in the source tree)
INFLATED_WEIGHTS = "cvae-tail.safetensors"  # what `cvae inflate` writes by default


def data_dir() -> Path:
    """The per-user folder for weights `cvae inflate` makes: $CVAE_HOME, else $XDG_DATA_HOME/cvae,
    else ~/.local/share/cvae. Never relative to the current directory, so every command finds them."""
    import os

    if os.environ.get("CVAE_HOME"):
        return Path(os.environ["CVAE_HOME"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base).expanduser() / "cvae"


def builtin_weights() -> Path | None:
    """The small model that ships with cvae (trained on a CPU from real package data), if installed."""
    from importlib import resources

    try:
        path = resources.files("cvae_cli.weights") / BUILTIN_WEIGHTS
    except ModuleNotFoundError:
        return None
    return Path(str(path)) if path.is_file() else None


def default_weights() -> tuple[Path, bool]:
    """(weights, whether they are the built-in small model): the SD VAE inflated by `cvae inflate`
    when there is one, else the built-in model."""
    inflated = data_dir() / INFLATED_WEIGHTS
    if inflated.is_file():
        return inflated, False
    builtin = builtin_weights()
    if builtin is None:
        raise CvaeError(f"no weights: run `cvae inflate` (writes {inflated}) or pass --weights")
    return builtin, True


# --- our models -------------------------------------------------------------------------------

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
        raise CvaeError(f"{where}: bad model config: {_one_line(e)}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CvaeError(f"{path} is not a readable config: {_one_line(e)}") from None
    if not isinstance(d, dict):
        raise CvaeError(f"{path} is not a readable config: not a JSON object")
    return d


def _read_model_source(path: Path) -> tuple[dict[str, Any], Path, dict[str, str]]:
    """(config dict, weights file, provenance) of a local folder or file."""
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CvaeError(f"{path} has no config.json (a model folder holds config.json and its weights)")
        return _read_json(path / "config.json"), _weights_file(path), {"source": str(path)}
    if not path.exists():
        raise CvaeError(f"no such file or folder: {path}")
    meta = _safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    if meta.get("format") == FORMAT:
        if meta.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise CvaeError(f"{path} has weights format_version {meta['format_version']}; "
                            f"this cvae reads {FORMAT_VERSION}: upgrade cvae")
        try:
            config = json.loads(meta.get("config", ""))
        except ValueError as e:
            raise CvaeError(f"{path} has an unreadable config in its metadata: {_one_line(e)}") from None
        return config, path, {k: v for k, v in meta.items() if k not in RESERVED_METADATA}
    if (path.parent / "config.json").is_file():  # a weights file inside a released folder
        return _read_json(path.parent / "config.json"), path, {"source": str(path)}
    raise CvaeError(f"{path} carries no model config (neither cvae metadata nor a config.json beside it): "
                    f"pass a file written by `cvae inflate` or a folder with config.json")


def load_model(source: str | Path, *, norm: str | None = None, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None) -> CausalVAE:
    """A ready (eval mode) CausalVAE from a folder, a cvae .safetensors or `owner/name[/subfolder]`.

    `norm` overrides the config's ("clip" in released configs). The weights' identity (`model_id`)
    is taken before any dtype cast, so a bf16 run labels its latents like an fp32 run.
    """
    where, dtype = str(source), None if dtype is None else dtype_named(dtype)
    if _looks_local(where):
        config, weights, provenance = _read_model_source(Path(source))
    else:
        hint = "pass a local file or folder instead"
        config_path = _hub_file(where, ("config.json",), hint)
        config, provenance = _read_json(config_path), {"source": where}
        weights = _hub_file(where, WEIGHT_FILES, hint)
    cfg = config_from_json(config, where, norm)
    state = {k: v for k, v in read_state_dict(weights).items() if not k.startswith("loss.")}
    with torch.device("meta"):  # no random init of weights about to be replaced
        model = CausalVAE(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_shapes(state, expected, f"{where} does not fit its config", strict=True)
    state = {k: v.float() for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.weights_id = _digest(cfg.to_json(), state)
    model.provenance = provenance
    return model.to(device=device, dtype=dtype).eval()


def save_model(model: CausalVAE, path: str | Path, **info: Any) -> Path:
    """One .safetensors with the config and `info` (init, source, arch, ...) in its metadata; atomic."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CvaeError(f"weights are saved as .safetensors, not {path.name}")
    extra = {**getattr(model, "provenance", {}), **info}
    meta = {k: str(v) for k, v in extra.items() if v is not None and k not in RESERVED_METADATA}
    meta.update(format=FORMAT, format_version=FORMAT_VERSION, config=model.config.to_json(), model_id=model_id(model))
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


def save_sd_vae(model: CausalVAE, path: str | Path) -> Path:
    """An image model (`CausalVAEConfig.is_image_model`) as an SD VAE file in diffusers' layout:
    what `cvae inflate --from` (and diffusers' `AutoencoderKL`) read. Atomic."""
    from safetensors.torch import save_file

    if not model.config.is_image_model:
        raise CvaeError("only an image model (every block 2-D, no temporal layers) can be written as an SD VAE")
    from .model.layers import CausalConv3d

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
        info["config"] = config_from_json(_read_json(path / "config.json"), str(path), None).to_dict() \
            if (path / "config.json").is_file() else None
        path = _weights_file(path)
    if not path.exists():
        raise CvaeError(f"no such file or folder: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        meta = _safetensors_metadata(path)
        with safe_open(str(path), "pt") as f:
            specs = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
        specs = {k: (s, _SAFETENSORS_DTYPES.get(d, d.lower())) for k, (s, d) in specs.items()}
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


def _digest(config_json: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the config and, per tensor, its name, shape and ~4096 evenly spaced values as
    float32: cheap on 229 M parameters, yet any retrained or differently inflated weights differ."""
    h = hashlib.sha256(config_json.encode())
    for name in sorted(tensors):
        t = tensors[name].detach()
        flat = t.reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to("cpu", torch.float32).contiguous()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:12]


def model_id(model: CausalVAE) -> str:
    """A short stable identity of a model's weights, for latent files to record.

    Models from `load_model` carry the id of the weights as read, so casting them to bf16 or
    moving them to a GPU keeps it; any other model is hashed as it stands.
    """
    return getattr(model, "weights_id", None) or _digest(model.config.to_json(), model.state_dict())
