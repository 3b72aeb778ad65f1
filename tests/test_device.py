"""Device and dtype: the one resolver, and the CUDA bf16 path checked on the CPU with fake tensors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cvae_cli import stream
from cvae_cli.device import dtype_named, placement, resolve
from cvae_cli.errors import CvaeError
from cvae_cli.model import CausalVAE
from conftest import FRAME_NORM, tiny_config

CUDA = torch.device("cuda", 0)
aten = torch.ops.aten
# ops that move or cast on purpose; every other op must see one device and one floating dtype
CONVERSIONS = {aten._to_copy, aten.copy_, aten.lift_fresh, aten.lift_fresh_copy, aten._pin_memory}


class OneDeviceOneDtype(TorchDispatchMode):
    """Raises where an op mixes devices, or floating dtypes, among its (non-scalar) tensors: what a
    GPU refuses (conv weight bf16, input fp32) or silently slows down on (host tensors in a GPU op)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket not in CONVERSIONS:
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0]
            devices = {t.device for t in tensors}
            dtypes = {t.dtype for t in tensors if t.is_floating_point()}
            if len(devices) > 1 or len(dtypes) > 1:
                raise AssertionError(f"{func} mixes {sorted(map(str, devices))} {sorted(map(str, dtypes))}")
        return func(*args, **kwargs)


def index(x: torch.Tensor, idx) -> torch.Tensor:
    """`x[idx]` for ints, slices, `...` and None, through view ops."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    fill = x.dim() - sum(1 for i in idx if i is not None and i is not Ellipsis)
    out, dim = x, 0
    for i in [j for i in idx for j in ([slice(None)] * fill if i is Ellipsis else [i])]:
        if i is None:
            out, dim = out.unsqueeze(dim), dim + 1
        elif isinstance(i, int):
            out = out.select(dim, i)
        elif isinstance(i, slice):
            start, stop, step = i.indices(out.shape[dim])
            out, dim = aten.slice.Tensor(out, dim, start, max(start, stop), step), dim + 1
        else:
            raise NotImplementedError(f"index {i!r}")
    return out


class ViewIndexing(TorchFunctionMode):
    """Python indexing, `copy_` and `contiguous` through the ops themselves: a CPU-only torch refuses
    these on a (fake) CUDA tensor before any op runs, for want of a CUDA device guard."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__:
            return index(*args)
        if func is torch.Tensor.__setitem__:
            x, idx, value = args
            index(x, idx).zero_().add_(value)
            return None
        if func is torch.Tensor.copy_:  # the same, straight to the op
            return aten.copy_.default(*args, **kwargs)
        if func is torch.Tensor.contiguous:  # the same, straight to the op
            x, fmt = args[0], kwargs.get("memory_format", torch.contiguous_format)
            return x if x.is_contiguous(memory_format=fmt) else aten.clone.default(x, memory_format=fmt)
        return func(*args, **kwargs)


@pytest.fixture
def fake_cuda(monkeypatch):
    """A model on a CUDA device in bf16, as fake tensors (shapes, devices and dtypes, no data): the
    stream path runs end to end on a machine without a GPU. Where a CPU-only torch cannot go (pinned
    host memory, Python indexing) or fake tensors have nothing to give (values for numpy), a stand-in
    does the same thing to shapes, devices and dtypes."""
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.Tensor, "numpy", lambda self, *a, **k: np.zeros(tuple(self.shape), np.uint8))
    with torch.device("meta"):  # weights without values, then placed as fake tensors
        model = CausalVAE(tiny_config(**FRAME_NORM)).eval().to(torch.bfloat16)
    with FakeTensorMode(allow_non_fake_inputs=True), ViewIndexing():
        model = model.to_empty(device=CUDA)
        with OneDeviceOneDtype():
            yield model


def frames(n: int, h: int = 40, w: int = 56) -> list[np.ndarray]:
    return [np.zeros((h, w, 3), np.uint8) for _ in range(n)]


@pytest.mark.parametrize("mode, tile", [("stream", None), ("stream", 64), ("window", None), ("whole", 64)])
def test_encode_and_decode_on_cuda_bf16_mix_no_device_or_dtype(fake_cuda, mode, tile):
    assert placement(fake_cuda) == (CUDA, torch.bfloat16)
    # tiles decoded without the colour match: it solves on the host from the tiles' values, which
    # fake tensors do not have (tests/test_stream.py tests it on real ones)
    opts = stream.StreamOptions(mode=mode, chunk=4, tile=tile, match_tiles=False)
    chunks = list(stream.encode_frames(fake_cuda, frames(9, 72, 104), opts))
    mean = torch.cat([m for m, _ in chunks], dim=1)
    assert mean.device == CUDA and mean.dtype == torch.bfloat16 and tuple(mean.shape) == (4, 3, 9, 13)
    decoded = list(stream.decode_latents(fake_cuda, [mean[:, :2], mean[:, 2:]], opts, 72, 104))
    assert sum(len(d) for d in decoded) == 9 and decoded[0].shape[1:] == (72, 104, 3)
    host = torch.zeros(4, 3, 9, 13)  # latents as read from a file: fp32, on the host
    assert sum(len(d) for d in stream.decode_latents(fake_cuda, [host], opts, 72, 104)) == 9


def test_the_check_sees_a_mismatch_where_there_is_one(fake_cuda):
    # fp32 pixels into the bf16 model: refused (by this check, or by torch's own). Without grad, as
    # the stream runs: autograd on a fake CUDA tensor needs a CUDA device guard a CPU torch lacks.
    with torch.no_grad(), pytest.raises((AssertionError, RuntimeError), match="mixes|should be the same"):
        fake_cuda.encode(torch.zeros(1, 3, 1, 16, 16, device=CUDA))
    with pytest.raises(AssertionError, match="mixes"):  # a host tensor in a GPU op
        torch.zeros(4, device=CUDA, dtype=torch.bfloat16) + torch.zeros(4, dtype=torch.bfloat16)


def test_resolve_auto_and_named_dtypes():
    assert resolve("cpu", "auto") == (torch.device("cpu"), torch.float32)
    assert resolve("auto", "bf16")[1] == torch.bfloat16 and dtype_named("half") == torch.float16
    if not torch.cuda.is_available():
        assert resolve("auto")[0] == torch.device("cpu")
        with pytest.raises(CvaeError, match="no CUDA GPU is visible"):
            resolve("cuda:1")
    with pytest.raises(CvaeError, match="--dtype int8: use auto, fp32, bf16 or fp16"):
        resolve("cpu", "int8")
    with pytest.raises(CvaeError, match="--device gpu0: expected cpu, cuda or cuda:N"):
        resolve("gpu0")
