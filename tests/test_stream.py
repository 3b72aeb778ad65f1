"""Chunked inference against whole-clip inference, tiling, and memory that ignores video length."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.memory import LiveTensorBytes
from cvae_cli.model import StreamCache
from cvae_cli.stream import StreamOptions, decode_latents, encode_frames, groups, padded_length
from conftest import FRAME_NORM, clip as frames_of, random_model, rel_err

def clip(n: int, h: int = 40, w: int = 56, seed: int = 0) -> list[np.ndarray]:
    return frames_of(n, h, w, seed)  # this file's clips are 40x56


def encode(model, frames, **options):
    chunks = list(encode_frames(model, frames, StreamOptions(**options)))
    return torch.cat([m for m, _ in chunks], 1), torch.cat([lv for _, lv in chunks], 1)


@pytest.fixture(scope="module")
def frame_model():
    return random_model(**FRAME_NORM)


def test_groups_cut_with_overlap_and_flag_the_last():
    assert list(groups(range(10), 5, 4)) == [([0, 1, 2, 3, 4], False), ([5, 6, 7, 8], False), ([9], True)]
    assert list(groups(range(9), 5, 4, overlap=1)) == [([0, 1, 2, 3, 4], False), ([4, 5, 6, 7, 8], True)]
    assert [padded_length(n) for n in (1, 2, 5, 6, 23)] == [1, 5, 5, 9, 25]


@pytest.mark.parametrize("frames", [23, 17, 1, 6])
@pytest.mark.parametrize("chunk", [4, 8, 12, 16])
def test_stream_encode_equals_whole_clip(frame_model, frames, chunk):
    mean, logvar = encode(frame_model, clip(frames), mode="whole")
    s_mean, s_logvar = encode(frame_model, clip(frames), mode="stream", chunk=chunk)
    assert mean.shape[1] == (padded_length(frames) - 1) // 4 + 1
    assert rel_err(s_mean, mean) < 1e-5 and rel_err(s_logvar, logvar) < 1e-5


@pytest.mark.parametrize("sizes", [[2, 1, 1, 1, 1, 1], [3, 4], [1] * 7, [1, 2, 4], [7]])
def test_decoder_look_ahead_is_right_at_every_boundary(frame_model, sizes):
    z = torch.randn(1, 4, sum(sizes), 5, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = frame_model.decode(z)
        cache, outs, start = StreamCache(), [], 0
        for i, size in enumerate(sizes):
            cache.final = i == len(sizes) - 1
            outs.append(frame_model.decode(z[:, :, start:start + size], cache))
            start += size
    assert whole.shape[2] == 1 + 4 * (sum(sizes) - 1)
    assert rel_err(torch.cat(outs, 2), whole) < 1e-5


@pytest.mark.parametrize("chunk", [4, 8, 16])
def test_stream_decode_equals_whole_clip(frame_model, chunk):
    z = torch.randn(4, 7, 5, 7, generator=torch.Generator().manual_seed(2))
    whole = np.concatenate(list(decode_latents(frame_model, [z], StreamOptions(mode="whole"), 37, 50)))
    parts = list(decode_latents(frame_model, [z[:, :3], z[:, 3:]], StreamOptions(chunk=chunk), 37, 50))
    streamed = np.concatenate(parts)
    assert streamed.shape == whole.shape == (25, 37, 50, 3) and len(parts) > 1
    assert np.abs(streamed.astype(int) - whole).max() <= 1  # float rounding, then uint8 rounding


def test_clip_norm_stream_is_an_approximation_that_window_mode_avoids_for_short_clips():
    model = random_model()  # released layout: clip norm, legacy attention
    mean, _ = encode(model, clip(21), mode="whole")
    assert rel_err(encode(model, clip(21), mode="window")[0], mean) == 0  # one 65-frame window
    assert rel_err(encode(model, clip(21), mode="stream", chunk=8)[0], mean) > 1e-4


def test_window_mode_restarts_every_65_frames(frame_model):
    frames = clip(70, 16, 16)
    mean, _ = encode(frame_model, frames, mode="window")
    first, _ = encode(frame_model, frames[:65], mode="whole")
    second, _ = encode(frame_model, frames[64:], mode="whole")
    assert mean.shape[1] == 19  # 70 frames pad to 73 = 1 + 4*18
    assert torch.equal(mean, torch.cat([first, second[:, 1:]], 1))


def test_tiles_stream_like_whole_frames(frame_model):
    frames = clip(9, 72, 104)
    whole, _ = encode(frame_model, frames, mode="whole", tile=64)
    streamed, _ = encode(frame_model, frames, mode="stream", chunk=4, tile=64)
    untiled, _ = encode(frame_model, frames, mode="whole")
    assert rel_err(streamed, whole) < 1e-5
    assert whole.shape == untiled.shape == (4, 3, 9, 13)
    # each latent is its tile's own output where one tile covers it, a blend of the tiles' where
    # several do: tiles at pixels (0|8, 0|40), 64 wide, i.e. latents (0|1, 0|5), 8 wide
    own = torch.full((4, *whole.shape), float("nan"))
    for k, (y, x) in enumerate([(0, 0), (0, 40), (8, 0), (8, 40)]):
        tile, _ = encode(frame_model, [f[y:y + 64, x:x + 64] for f in frames], mode="whole")
        own[k, :, :, y // 8:y // 8 + 8, x // 8:x // 8 + 8] = tile
    covered = (~own.isnan()).sum(0)
    assert covered.min() == 1 and covered.max() == 4
    single = own.nan_to_num(0).sum(0)
    assert torch.allclose(whole[covered == 1], single[covered == 1], rtol=1e-5, atol=1e-6)
    low, high = own.nan_to_num(float("inf")).amin(0), own.nan_to_num(float("-inf")).amax(0)
    assert ((whole >= low - 1e-5) & (whole <= high + 1e-5)).all()
    assert (whole[covered > 1] != untiled[covered > 1]).any()  # the blend is not the untiled frame
    small, _ = encode(frame_model, clip(5, 40, 56), mode="whole", tile=64)
    assert torch.equal(small, encode(frame_model, clip(5, 40, 56), mode="whole")[0])  # one tile: exact


def test_tiled_decode_streams_like_whole_and_covers_the_frame(frame_model):
    z = torch.randn(4, 3, 13, 17, generator=torch.Generator().manual_seed(3))

    def decode(**options):
        return np.concatenate(list(decode_latents(frame_model, [z], StreamOptions(**options), 104, 136)))

    tiled, tiled_whole, plain = decode(tile=64, chunk=4), decode(tile=64, mode="whole"), decode(chunk=4)
    assert tiled.shape == plain.shape == (9, 104, 136, 3)
    assert np.abs(tiled.astype(int) - tiled_whole).max() <= 1
    assert np.array_equal(decode(tile=160, chunk=4), plain)  # a tile larger than the frame is no tile
    assert not np.array_equal(tiled, plain)


def peak_bytes(model, frames: int, mode: str) -> int:
    frame = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    with LiveTensorBytes() as counter:
        for _ in encode_frames(model, (frame for _ in range(frames)), StreamOptions(mode=mode, chunk=8)):
            pass
    return counter.peak


def test_peak_memory_does_not_grow_with_length(frame_model):
    short, long = peak_bytes(frame_model, 50, "stream"), peak_bytes(frame_model, 200, "stream")
    assert long <= 1.15 * short, (short, long)
    whole_short, whole_long = peak_bytes(frame_model, 50, "whole"), peak_bytes(frame_model, 200, "whole")
    assert whole_long > 3 * whole_short > 3 * long  # the measure sees growth where there is some


def decode_peak(model, latents: int, chunk: int = 4) -> int:
    z = torch.randn(4, latents, 4, 6, generator=torch.Generator().manual_seed(0))
    with LiveTensorBytes() as counter:
        for _ in decode_latents(model, [z], StreamOptions(chunk=chunk), 32, 48):
            pass
    return counter.peak


def test_decode_flush_is_no_larger_than_a_steady_step(frame_model):
    # the last latent goes through as any other, then an empty step releases the held-back frames;
    # decoding both at once would make the last step as large as a two-latent (8-frame) chunk's
    one = decode_peak(frame_model, 50)
    assert decode_peak(frame_model, 200) <= 1.05 * one and decode_peak(frame_model, 3) <= 1.05 * one
    assert one < 0.9 * decode_peak(frame_model, 50, chunk=8)


def test_bfloat16_path_stays_close_to_float32(frame_model):
    import copy

    half = copy.deepcopy(frame_model).to(torch.bfloat16)
    frames = clip(9, 24, 32)
    mean, _ = encode(frame_model, frames, chunk=4)
    bf16, _ = encode(half, frames, chunk=4)  # the inputs follow the model's dtype
    assert bf16.dtype == torch.bfloat16 and rel_err(bf16.float(), mean) < 2e-2
    pixels = np.concatenate(list(decode_latents(half, [mean], StreamOptions(chunk=4), 24, 32)))
    reference = np.concatenate(list(decode_latents(frame_model, [mean], StreamOptions(chunk=4), 24, 32)))
    assert pixels.shape == reference.shape and np.abs(pixels.astype(int) - reference).mean() < 2


def test_auto_cut_bounds_pixels_per_chunk_and_tiles_past_1080p():
    from cvae_cli.stream import auto_cut

    assert auto_cut(1280, 720) == (4, None)  # 720p: the 4-frame floor
    assert auto_cut(640, 360) == (16, None) and auto_cut(94, 70) == (16, None)  # small: the 16-frame cap
    assert auto_cut(3840, 2160) == (12, 512)  # 4K: 512-pixel tiles, chunk sized by the tile
    assert auto_cut(3840, 2160, 8, None) == (8, None)  # what the user gives stays


def test_auto_tiles_photos_past_1080p_but_streams_a_video_in_whole_frames():
    """A video streamed exactly keeps whole frames (tiles would each keep caches, and blend seams);
    images, Open-Sora-Plan's windows and an inexact stream keep their tiles."""
    from cvae_cli.model import CausalVAEConfig
    from cvae_cli.stream import choose_options

    exact = CausalVAEConfig(norm="frame", encoder_attention="AttnBlock3DFix", decoder_attention="AttnBlock3DFix")
    released = CausalVAEConfig()
    assert choose_options(exact, 3840, 2160) == StreamOptions(mode="stream", chunk=4, tile=None)
    assert choose_options(exact, 3840, 2160, image=True) == StreamOptions(mode="stream", chunk=12, tile=512)
    assert choose_options(exact, 3840, 2160, mode="whole").tile == 512  # no caches there: tiles bound memory
    assert choose_options(exact, 3840, 2160, tile=256).tile == 256  # what the user gives stays
    assert choose_options(released, 3840, 2160, mode="stream").tile == 512  # approximate anyway: bounded
    assert choose_options(released, 3840, 2160) == StreamOptions(mode="window", chunk=16, tile=256)


def test_the_tile_blend_adds_no_seam_to_a_real_photo():
    """Steps that agree where tiles overlap (per pixel, 8x down, 8x up) come out of the tiler as
    from the whole frame, to float32 rounding, on scikit-image's coffee photo: the weights sum to one
    everywhere. Seams a model shows are its tiles disagreeing (per-tile GroupNorm statistics), which
    `benchmarks/seams.py` measures."""
    skimage = pytest.importorskip("skimage")
    from PIL import Image

    from cvae_cli.tiles import Tiler

    photo = np.array(Image.open(Path(skimage.__file__).parent / "data" / "coffee.png").convert("RGB"))
    x = torch.from_numpy(photo[:400, :600]).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1  # (1, 3, 1, H, W)
    steps = {
        1.0: (lambda t, cache: t * 0.5 + 0.1),
        1 / 8: (lambda t, cache: F.avg_pool3d(t, (1, 8, 8))),
        8.0: (lambda t, cache: t.repeat_interleave(8, -1).repeat_interleave(8, -2)),
    }
    for (scale, step), match in itertools.product(steps.items(), (False, True)):
        src = x if scale <= 1 else F.avg_pool3d(x, (1, 8, 8))
        tile = 128 if scale <= 1 else 16
        whole = step(src, None)
        tiled = Tiler(tile, scale, streaming=False, match=match).run(step, src, final=True)
        assert len(Tiler(tile, scale, False).spans(src.shape[-1])) > 3  # many seams
        assert torch.allclose(tiled, whole, atol=2e-6), (scale, match, (tiled - whole).abs().max())


def test_matched_tiles_lose_each_tiles_own_colour():
    """A step that shifts each tile's colour by its own constant (per channel and frame, as per-tile
    GroupNorm statistics do) leaves seams in the plain blend; matched, the result is the whole
    frame's plus one constant per channel and frame, with no seam. The shifts here alternate from
    tile to tile: a trend across the frame is indistinguishable from a difference between every
    tile's two sides, which the match fits and leaves alone (`TileMatch.offsets`)."""
    from cvae_cli.tiles import Tiler

    torch.manual_seed(0)
    z = torch.randn(2, 4, 3, 36, 60)  # two clips of three latent frames, tiled by 16: 3 x 5 tiles
    size = torch.randn(2, 3, 3, 1, 1)  # per clip, channel and frame
    tiler = Tiler(16, 8, streaming=False)
    ys, xs = tiler.spans(36), tiler.spans(60)

    def step(t, cache, shift=True):
        y = t[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2)
        if not shift:
            return y
        k = [i for i, ((y0, _), (x0, _)) in enumerate(itertools.product(ys, xs))
             if torch.equal(t, z[..., y0:y0 + 16, x0:x0 + 16])][0]
        return y + size * (-1) ** (k // len(xs) + k % len(xs))

    assert (len(ys), len(xs)) == (3, 5)
    whole = step(z, None, shift=False)
    plain = tiler.run(step, z, final=True)
    matched = Tiler(16, 8, streaming=False, match=True).run(step, z, final=True)
    assert (plain - whole).flatten(3).std(-1).mean() > 0.1  # the plain blend keeps the tiles' colours
    left = (matched - whole).flatten(3)
    assert left.std(-1).max() < 1e-4, left.std(-1).max()  # one constant per channel and frame


def test_tiled_decode_of_a_real_photo_shows_no_seam():
    """The shipped model decoding examples/coffee.jpg in 128-pixel tiles: the PSNR of a band of 3
    pixels either side of every inner tile edge, against the rest of the photo, falls no further
    behind than it does for the untiled photo (the band's content alone makes it differ). Without
    matching the tiles' colours, the seams cost the band 0.74 dB (benchmarks/README.md)."""
    from PIL import Image

    from benchmarks.seams import band_mask, psnr
    from cvae_cli.checkpoints import builtin_weights, load_model

    photo = np.array(Image.open(Path(__file__).parents[1] / "examples" / "coffee.jpg").convert("RGB"))
    model = load_model(str(builtin_weights()))
    h, w = photo.shape[:2]
    band = band_mask(h, w, 128, 0.25)

    def gap(tile, match=True):  # PSNR in the band less PSNR in the rest
        opts = StreamOptions(chunk=4, tile=tile, match_tiles=match)
        mean = torch.cat([m for m, _ in encode_frames(model, [photo], opts)], 1)
        out = np.concatenate(list(decode_latents(model, [mean], opts, h, w)))[0]
        return psnr(photo, out, band) - psnr(photo, out, ~band)

    whole = gap(None)
    assert gap(128, match=False) - whole < -0.5  # the seams this test is about
    assert gap(128) - whole > -0.15


def test_a_tile_edge_weighs_almost_nothing_where_a_neighbour_covers_it():
    from cvae_cli.tiles import Tiler

    tiler = Tiler(128, 1.0, streaming=False)
    ramp = tiler._ramp(128, 128, (True, True), (True, False))
    assert ramp[0, 64] == ramp[127, 64] == ramp[64, 0] == pytest.approx(1 / 33)
    assert ramp[64, 127] == 1  # the frame's own border: no neighbour, full weight
