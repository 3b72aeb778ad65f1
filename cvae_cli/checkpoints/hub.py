"""The Hugging Face hub: `owner/name[/subfolder]` ids, read from the local cache first, and one
quick reachability check before any download, so that no network means one line within seconds."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from ..errors import CvaeError
from .files import one_line

DEFAULT_SD_VAE = "stabilityai/sd-vae-ft-mse"
SD_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_LOCAL_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".json")


def looks_local(source: str) -> bool:
    """A path (existing or meant to be one) rather than `owner/name[/subfolder]` on the hub."""
    return (Path(source).exists() or source.startswith(("/", ".", "~")) or "\\" in source
            or source.endswith(_LOCAL_SUFFIXES) or source.count("/") < 1)


def _split_repo(source: str) -> tuple[str, str | None]:
    parts = source.strip("/").split("/")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None


def hub_file(source: str, names: tuple[str, ...], hint: str) -> Path:
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
            raise CvaeError(f"{source} is neither a local path nor a Hugging Face repo id: {one_line(e)}") from None
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
            raise CvaeError(f"cannot download {source} from the Hugging Face hub: {one_line(e)}") from None
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
        raise CvaeError(f"cannot reach the Hugging Face hub ({constants.ENDPOINT}: {one_line(e)}) and {source} "
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
    if looks_local(source):
        if not Path(source).exists():
            raise CvaeError(f"no such file: {source}")
        return Path(source)
    return hub_file(source, SD_WEIGHT_FILES, "pass a local file with --from PATH instead")

