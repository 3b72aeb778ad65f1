"""Every kernel-level lever computes the same function as the plain path, and compiles without graph
breaks or recompiles (CPU proofs; CUDA-only levers skip)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cvae_cli import convert, media, prefetch
from torch._dynamo.utils import counters

from cvae_cli.accel import speed_up
from cvae_cli.errors import CvaeError
from cvae_cli.latents import LatentFile
from cvae_cli.model import Levers, StreamCache
from cvae_cli.model import levers as levers_module
from cvae_cli.model.blocks import ResnetBlock3D
from cvae_cli.model.layers import fused_group_norm_silu, group_norm_silu
from cvae_cli.stream import StreamOptions, decode_batch, decode_latents, encode_batch, encode_frames
from conftest import FRAME_NORM, clip, random_model, rel_err

def stream(model, frames, chunk=4):
    opts = StreamOptions(chunk=chunk)
    mean = torch.cat([m for m, _ in encode_frames(model, frames, opts)], 1)
    out = np.concatenate(list(decode_latents(model, [mean], opts, frames[0].shape[0], frames[0].shape[1])))
    return mean, out


@pytest.fixture(scope="module")
def model():
    return random_model()  # released layout: clip norm, legacy attention


@pytest.fixture(scope="module")
def plain(model):
    return stream(model, clip(13))


def assert_same(fast, plain, tol=1e-5):
    assert rel_err(fast[0], plain[0]) < tol
    assert np.abs(fast[1].astype(int) - plain[1]).max() <= 1  # float rounding, then uint8 rounding


def norm_then_silu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, per_frame: bool) -> torch.Tensor:
    """GroupNorm (32 groups) then SiLU, the plain way: per frame folds time into the batch."""
    if not per_frame:
        return F.silu(F.group_norm(x, 32, w, b, 1e-6))
    n, c, t, h, width = x.shape
    frames = x.transpose(1, 2).reshape(n * t, c, h, width)
    return F.silu(F.group_norm(frames, 32, w, b, 1e-6)).reshape(n, t, c, h, width).transpose(1, 2)


def test_fused_norm_silu_equals_norm_then_silu():
    fused = fused_group_norm_silu()
    w, b = torch.randn(64), torch.randn(64)
    for shape in [(1, 64, 5, 8, 12), (2, 64, 4, 6, 10)]:  # a second shape must not need a new graph
        x = torch.randn(shape) * 3 + 1
        x[:, :, 0] *= 10  # frames of their own scale: clip and frame statistics differ
        for per_frame in (False, True):
            plain = norm_then_silu(x, w, b, per_frame)
            ref = group_norm_silu(x, w, b, 32, 1e-6, per_frame, True)
            assert rel_err(ref, plain) < 1e-6  # the model's own path is GroupNorm then SiLU
            assert rel_err(fused(x, w, b, 32, 1e-6, per_frame, True), plain) < 1e-5
        assert rel_err(norm_then_silu(x, w, b, True), norm_then_silu(x, w, b, False)) > 1e-2


def test_fused_norm_model_streams_like_plain(model, plain):
    fast = speed_up(copy.deepcopy(model), fast=True)
    assert fast.levers == Levers(fused_norm=True)  # the exact levers stay on; no cuDNN on the CPU
    assert_same(stream(fast, clip(13)), plain)
    assert levers_module.active() == Levers()  # the model's levers were in force only while it ran


def test_levers_are_in_force_only_while_their_model_runs(model, monkeypatch):
    seen = []
    real = levers_module.running

    def spy(levers, cache):
        seen.append(levers)
        return real(levers, cache)

    monkeypatch.setattr("cvae_cli.model.vae.running", spy)
    plain_model = copy.deepcopy(model).use_levers(Levers.off())
    with torch.no_grad():
        plain_model.decode(model.encode(torch.zeros(1, 3, 1, 32, 48)).mean)
    assert seen == [Levers(), Levers.off()] and levers_module.active() == Levers()


def test_compiled_block_carries_its_stream_cache_like_plain():
    """Dynamo traces through StreamCache (a dict keyed by layer): the compiled block, fed chunks of
    changing length, gives the plain block's output. aot_eager traces as inductor would, faster."""
    torch.manual_seed(0)
    block = ResnetBlock3D(32, 64, per_frame=True).eval()  # frame norm: chunking is exact
    compiled = torch.compile(copy.deepcopy(block), dynamic=True, backend="aot_eager")
    x = torch.randn(1, 32, 13, 6, 8)
    with torch.inference_mode():
        whole = block(x)
        cache, parts = StreamCache(), []
        for s, e in [(0, 5), (5, 9), (9, 13)]:
            parts.append(compiled(x[:, :, s:e], cache))
    assert rel_err(torch.cat(parts, 2), whole) < 1e-5


def steps(model, x: torch.Tensor, z: torch.Tensor, graphs: list[int], before=lambda cache: None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode x in chunks of 1 + 4, 4, ... frames and decode z in steps of 1 + 2, 2, ... latents,
    then the flush, as `stream` does (chunk 4, then chunk 8: a decoder fed one latent a step holds
    frames back for look-ahead through its first four steps, each of another length); the compiled
    graphs so far are noted after every step; `before(cache)` is called before every step."""
    cache, means = StreamCache(), []
    cuts = [0, *range(5, x.shape[2] + 1, 4)]
    for i in range(len(cuts) - 1):
        cache.final = i == len(cuts) - 2
        before(cache)
        means.append(model.encode(x[:, :, cuts[i]:cuts[i + 1]], cache).mean)
        graphs.append(counters["stats"]["unique_graphs"])
    cache, frames = StreamCache(), []
    cuts = [0, *range(3, z.shape[2] + 1, 2), z.shape[2]]
    for i in range(len(cuts) - 1):
        cache.final = i == len(cuts) - 2
        before(cache)
        frames.append(model.decode(z[:, :, cuts[i]:cuts[i + 1]], cache))
        graphs.append(counters["stats"]["unique_graphs"])
    return torch.cat(means, 2), torch.cat(frames, 2)


def test_compiled_blocks_stream_like_plain_without_recompiling_after_two_chunks(model, monkeypatch):
    """Each block compiles on its own; a stream's first and last steps run eagerly, so graphs are
    made at the second step of each direction and never after.
    aot_eager traces as inductor would, without generating code."""
    monkeypatch.setattr(levers_module, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    fast = copy.deepcopy(model).use_levers(Levers(compile=True))
    x, z = torch.rand(1, 3, 17, 32, 48) * 2 - 1, torch.randn(1, 4, 9, 4, 6)
    x2, z2 = x.flip(2), z.flip(2)  # a second video of the size: no new graph (made, like the first, outside inference mode)
    with torch.inference_mode():
        expected = steps(model, x, z, [])
        graphs: list[int] = []
        got = steps(fast, x, z, graphs)
        again = steps(fast, x2, z2, graphs)
        expected_again = steps(model, x2, z2, [])
    enc, dec = graphs[:4], graphs[4:9]  # 4 encode steps; 4 decode steps and the flush
    assert enc[0] == 0 and enc[1] > 0 and enc[1:] == [enc[1]] * 3, graphs
    assert dec[0] == enc[1] and dec[1] > dec[0] and dec[1:] == [dec[1]] * 4, graphs
    assert graphs[9:] == [dec[1]] * 9, graphs
    assert graphs[-1] <= sum(1 for _ in fast.blocks())  # at most one graph per block: none recompiled
    for fast_out, plain_out in zip((*got, *again), (*expected, *expected_again)):
        assert rel_err(fast_out, plain_out) < 1e-5
    torch._dynamo.reset()


def test_blocks_of_one_shape_share_a_graph_while_streaming(monkeypatch):
    """Three resnets a level: a compiled stream makes one graph per distinct block shape (its type,
    its weights' shapes, its input's shape and strides: a resnet after an upsampler is given a
    strided view) among the steps that compile (a stream's steady steps), not one per block, and
    still streams like the plain model. Backend "eager": dynamo's graphs, no compiler."""
    monkeypatch.setattr(levers_module, "BACKEND", "eager")
    torch._dynamo.reset()
    counters.clear()
    model = random_model(num_res_blocks=3)
    fast = copy.deepcopy(model).use_levers(Levers(compile=True))
    steady, shapes = [False], set()

    def note(block, args):
        if steady[0]:
            shapes.add((type(block), tuple(p.shape for p in block.parameters()), args[0].shape, args[0].stride()))

    hooks = [block.register_forward_pre_hook(note) for block in model.blocks()]
    x, z = torch.rand(1, 3, 13, 32, 48) * 2 - 1, torch.randn(1, 4, 5, 4, 6)
    with torch.inference_mode():
        expected = steps(model, x, z, [], lambda cache: steady.__setitem__(0, bool(cache.state) and not cache.final))
        graphs: list[int] = []
        got = steps(fast, x, z, graphs)
    for hook in hooks:
        hook.remove()
    blocks = sum(1 for _ in fast.blocks())
    assert graphs[-1] == len(shapes) < blocks * 2 // 3, (graphs, len(shapes), blocks)
    for fast_out, plain_out in zip(got, expected):
        assert rel_err(fast_out, plain_out) < 1e-5
    torch._dynamo.reset()


@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_a_step_traces_without_graph_breaks(model, part):
    """torch.compile sees a whole encoder or decoder step, first and later, as one graph."""
    x = torch.rand(1, 3, 5, 32, 48) if part == "encoder" else torch.randn(1, 4, 2, 4, 6)
    step = getattr(model, part)
    with torch.inference_mode():
        for cache in (None, StreamCache()):
            for _ in range(2 if cache is not None else 1):  # a stream's first step, then a later one
                explained = torch._dynamo.explain(step)(x if cache is None or not cache.state else x[:, :, 1:], cache)
                assert explained.graph_break_count == 0, explained.break_reasons
                assert explained.graph_count == 1
                step(x if cache is None or not cache.state else x[:, :, 1:], cache)
    torch._dynamo.reset()


@pytest.mark.parametrize("norm, tile", [({}, None), (FRAME_NORM, 64)])
def test_batched_clips_equal_one_by_one(norm, tile):
    model = random_model(**norm)
    clips = [clip(17, 40, 72, seed=1), clip(9, 40, 72, seed=2), clip(23, 40, 72, seed=3), [], clip(17, 40, 72, seed=4)]
    opts = StreamOptions(chunk=8, tile=tile)
    means: dict[int, list] = {i: [] for i in range(len(clips))}
    for i, mean, _ in encode_batch(model, clips, opts):
        means[i].append(mean)
    for i, frames in enumerate(clips):
        if not frames:
            assert not means[i]
            continue
        alone = torch.cat([m for m, _ in encode_frames(model, frames, opts)], 1)
        assert rel_err(torch.cat(means[i], 1), alone) < 1e-5
    latents = [torch.cat(means[i], 1) for i in (0, 1, 2, 4)]
    outs: dict[int, list] = {i: [] for i in range(4)}
    for i, frames in decode_batch(model, [[z] for z in latents], opts, 40, 72):
        outs[i].append(frames)
    for i, z in enumerate(latents):
        alone = np.concatenate(list(decode_latents(model, [z], opts, 40, 72)))
        assert np.abs(np.concatenate(outs[i]).astype(int) - alone).max() <= 1


def test_background_keeps_order_raises_the_producers_error_and_stops_early():
    assert list(prefetch.background(iter(range(50)), 3)) == list(range(50))

    def failing():
        yield from range(3)
        raise CvaeError("broken at frame 3")

    got = []
    with pytest.raises(CvaeError, match="broken at frame 3"):
        for item in prefetch.background(failing(), 2):
            got.append(item)
    assert got == [0, 1, 2]
    closed = []

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.append(True)

    for item in prefetch.background(endless(), 2):
        if item == 5:
            break
    assert closed == [True]  # the producer thread was stopped and its generator closed, no deadlock


def test_threaded_pipeline_equals_inline_and_surfaces_reader_errors(tmp_path, model, monkeypatch):
    src = tmp_path / "in.mp4"
    with media.VideoWriter(src, 24, 48, 32) as writer:
        for frame in clip(11):
            writer.write(frame)
    opts = StreamOptions(chunk=4)
    for depth in (0, 2):
        convert.encode_file(model, src, tmp_path / f"z{depth}.safetensors", opts, prefetch=depth)
        convert.decode_file(model, tmp_path / f"z{depth}.safetensors", tmp_path / f"o{depth}.mp4", opts,
                             prefetch=depth)
    assert torch.equal(LatentFile.open(tmp_path / "z0.safetensors").read(),
                       LatentFile.open(tmp_path / "z2.safetensors").read())
    assert (tmp_path / "o0.mp4").read_bytes() == (tmp_path / "o2.mp4").read_bytes()

    real = media.MediaFile.timed_frames

    def broken(self, **selection):
        for i, timed in enumerate(real(self, **selection)):
            if i == 6:
                raise CvaeError("in.mp4: corrupt packet")
            yield timed

    monkeypatch.setattr(media.MediaFile, "timed_frames", broken)
    before = sorted(p.name for p in tmp_path.iterdir())
    for depth in (0, 2):
        with pytest.raises(CvaeError, match="corrupt packet"):
            convert.encode_file(model, src, tmp_path / "bad.safetensors", opts, prefetch=depth)
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary file
