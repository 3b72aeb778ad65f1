"""The exact levers (`model.Levers`) compute the plain model's function: same outputs, same gradients,
fewer FLOPs, less memory. Plain = `Levers.off()`; every comparison is 1e-5 relative in float32."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.memory import LiveTensorBytes, measure
from cvae_cli.checkpoints import config_from_json
from cvae_cli.model import CausalVAE, Levers, StreamCache, image_config
from cvae_cli.model import blocks, layers
from cvae_cli.model.slices import run_in_slices, sliced
from cvae_cli.stream import StreamOptions, decode_batch, decode_latents, encode_batch, encode_frames
from conftest import FRAME_NORM, clip, fixture_file, random_model, rel_err

V1_1_0 = dict(encoder_conv_in="Conv2d", encoder_resnet_blocks=("ResnetBlock2D",) * 2 + ("ResnetBlock3D",) * 2,
              encoder_spatial_downsample=("Downsample",) * 3 + ("",),
              encoder_temporal_downsample=("", "TimeDownsampleRes2x", "TimeDownsampleRes2x", ""),
              decoder_temporal_upsample=("", "", "TimeUpsampleRes2x", "TimeUpsampleRes2x"),
              encoder_attention="AttnBlock3DFix", decoder_attention="AttnBlock3DFix")
IMAGE = {k: v for k, v in image_config().to_dict().items() if k not in ("hidden_size", "hidden_size_mult", "num_res_blocks")}
EVERY_SLICE = Levers(slice_elements=1)  # one frame per slice at every stage: the hardest case


def plain(model: CausalVAE) -> CausalVAE:
    return copy.deepcopy(model).use_levers(Levers.off())


def round_trip(model, frames, **options):
    opts = StreamOptions(**options)
    mean = torch.cat([m for m, _ in encode_frames(model, frames, opts)], 1)
    h, w = frames[0].shape[:2]
    return mean, np.concatenate(list(decode_latents(model, [mean], opts, h, w)))


def assert_same(fast, slow):
    assert rel_err(fast[0], slow[0]) < 1e-5
    assert np.abs(fast[1].astype(int) - slow[1]).max() <= 1  # float rounding, then uint8 rounding


def encoded(model: CausalVAE, x: torch.Tensor) -> torch.Tensor:
    """The encoder's moments (mean, log-variance), as Open-Sora-Plan's reference holds them."""
    post = model.encode(x)
    return torch.cat([post.mean, post.logvar], dim=1)


@pytest.mark.parametrize("version", ["1.0.0", "1.1.0"])
@torch.no_grad()
def test_levers_reproduce_open_sora_plan_like_the_plain_path(version):
    f = safe_open(str(fixture_file(version)), "pt")
    model = CausalVAE(config_from_json(json.loads(f.metadata()["config"]))).eval()
    model.load_state_dict({k[6:]: f.get_tensor(k).float() for k in f.keys() if k.startswith("model.")})
    slow = plain(model)
    for frames in (1, 9):
        x, moments, decoded = (f.get_tensor(f"{name}.t{frames}") for name in ("input", "moments", "decoded"))
        reference = encoded(slow, x), slow.decode(moments[:, :4])
        for levers in (Levers(), EVERY_SLICE):
            fast = model.use_levers(levers)
            got = encoded(fast, x), fast.decode(moments[:, :4])
            assert rel_err(got[0], moments) < 1e-4 and rel_err(got[1], decoded) < 1e-4  # Open-Sora-Plan's own
            assert rel_err(got[0], reference[0]) < 1e-5 and rel_err(got[1], reference[1]) < 1e-5


@pytest.mark.parametrize("layout", ["v1.0.0 frame", "v1.1.0 frame", "v1.0.0 clip", "v1.1.0 clip"])
@pytest.mark.parametrize("mode, tile", [("stream", None), ("whole", 64)])
def test_levers_stream_and_tile_like_the_plain_path(layout, mode, tile):
    arch, norm = layout.split()
    model = random_model(**{**(V1_1_0 if arch == "v1.1.0" else {}), **(FRAME_NORM if norm == "frame" else {})})
    frames = clip(9, 40, 88)  # chunk 4: 5 frames, then 4; tile 64: two tiles side by side
    slow = round_trip(plain(model), frames, mode=mode, chunk=4, tile=tile)
    for levers in (Levers(), EVERY_SLICE):
        assert_same(round_trip(model.use_levers(levers), frames, mode=mode, chunk=4, tile=tile), slow)


def test_levers_batch_like_the_plain_path():
    model = random_model(**FRAME_NORM).use_levers(EVERY_SLICE)
    clips = [clip(9, seed=1), clip(5, seed=2), clip(1, seed=3)]  # 1: an image, fold and phases alone
    opts = StreamOptions(chunk=4)
    got: dict[int, list] = {i: [] for i in range(3)}
    for i, mean, _ in encode_batch(model, clips, opts):
        got[i].append(mean)
    latents = [torch.cat(got[i], 1) for i in range(3)]
    outs: dict[int, list] = {i: [] for i in range(3)}
    for i, frames in decode_batch(model, [[z] for z in latents], opts, 32, 48):
        outs[i].append(frames)
    for i, frames in enumerate(clips):
        assert_same((latents[i], np.concatenate(outs[i])), round_trip(plain(model), frames, chunk=4))


def test_slicing_is_off_where_it_would_change_the_result():
    """A clip norm pools over what it is given: sliced, the released layout would compute something
    else. The model keeps such stages whole; only the frame-local ones are sliced."""
    model, cache = random_model(), None  # released layout: clip norm, legacy attention
    x = torch.randn(1, 3, 9, 32, 48)
    with torch.no_grad():
        stages = [(model.encoder.conv_in, 1), (model.encoder.down[0], 1)]
        in_slices = run_in_slices(stages, x, cache, elements=1)
        whole = model.encoder.down[0](model.encoder.conv_in(x))
        assert rel_err(in_slices, whole) > 1e-3  # why slicing is off for clip-norm stages
    assert not any(sliced(model.encoder, True)) and not any(sliced(model.decoder, False))  # nothing sliced
    v1_1_0 = sliced(random_model(**V1_1_0).encoder, True)
    assert v1_1_0 == [True] * 3 + [False] * 5  # v1.1.0: conv_in and two levels of 2-D blocks
    frame_norm = random_model(**FRAME_NORM)
    assert all(sliced(frame_norm.encoder, True)) and all(sliced(frame_norm.decoder, False))


def grads(model: CausalVAE, x: torch.Tensor, checkpointed: bool = False) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(model).train()
    x = x.detach().requires_grad_()  # a fresh leaf: x.grad of another call must not add up here
    if checkpointed:  # as a trainer may: every level recomputed in backward
        for level in [*model.encoder.down, *model.decoder.up]:
            forward = level.forward
            level.forward = lambda h, cache=None, f=forward: torch.utils.checkpoint.checkpoint(
                f, h, cache, use_reentrant=False)
    post = model.encode(x)
    z = post.sample(torch.Generator().manual_seed(0))
    loss = (model.decode(z) - x).square().mean() + 1e-3 * post.logvar.exp().mean()
    loss.backward()
    return {"x": x.grad.clone(), **{k: p.grad for k, p in model.named_parameters()}}


def grad_err(fast: dict[str, torch.Tensor], slow: dict[str, torch.Tensor]) -> float:
    """The worst gradient error, each relative to its own size or, where smaller, to a thousandth of
    the whole gradient: a bias that a norm or a softmax follows has a true gradient of zero, so what
    either path computes for it (about 1e-9 of the whole) is rounding noise, not a result to match."""
    whole = torch.cat([g.double().flatten() for g in slow.values()]).norm()
    return max(((fast[k].double() - slow[k].double()).norm() / torch.clamp(slow[k].double().norm(), min=1e-3 * whole)).item()
               for k in slow)


@pytest.mark.parametrize("arch", ["v1.0.0", "v1.1.0", "image"])
@pytest.mark.parametrize("frames", [1, 5])
def test_gradients_through_the_levers_equal_the_plain_path(arch, frames):
    model = random_model(**{"v1.0.0": {}, "v1.1.0": V1_1_0, "image": IMAGE}[arch])
    x = (torch.rand(1, 3, frames, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1).requires_grad_()
    slow = grads(plain(model), x)
    for fast in (grads(model.use_levers(Levers()), x), grads(model, x, checkpointed=True)):
        assert fast.keys() == slow.keys()
        assert rel_err(fast["x"], slow["x"]) < 1e-5
        assert grad_err(fast, slow) < 5e-5  # measured up to 1.8e-5: fp32 sums in another order


def conv_flops(model: CausalVAE, frames: int, h: int = 32, w: int = 48) -> dict[str, int]:
    """Convolution FLOPs of one encode and one decode, per module that ran them (on the meta device:
    shapes only, no arithmetic)."""
    model = copy.deepcopy(model).to("meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        z = model.encode(torch.zeros(1, 3, frames, h, w, device="meta")).mean
        model.decode(z)
    return {name: sum(v for op, v in ops.items() if "convolution" in str(op))
            for name, ops in counter.get_flop_counts().items()}


def test_an_image_costs_a_third_of_its_3d_taps_and_upsampling_four_ninths():
    model = random_model()
    slow, fast = conv_flops(plain(model), 1), conv_flops(model.use_levers(Levers()), 1)
    saved = 0
    for name, module in model.named_modules():
        top, _, rest = name.partition(".")  # the counter names modules from the first one called
        owned = slow.get(f"{type(getattr(model, top)).__name__}.{rest}") if rest else None
        if isinstance(module, layers.CausalConv3d) and not name.endswith("upsample.conv"):
            if owned is None:  # quant_conv, post_quant_conv: called on their own, one tap
                assert module.time_kernel == 1, name
                continue
            saved += owned - owned // module.time_kernel  # one tap of k sees the image
        elif isinstance(module, layers.SpatialUpsample2x):
            saved += owned - owned * 16 // 36  # 4 taps per output pixel of the 4 phases, not 9
    assert fast["Global"] == slow["Global"] - saved
    assert fast["Global"] < 0.4 * slow["Global"]


def test_a_clip_costs_fewer_flops_only_at_its_start_and_in_upsampling():
    model = random_model()
    slow, fast = conv_flops(plain(model), 17)["Global"], conv_flops(model.use_levers(Levers()), 17)["Global"]
    only_upsample = conv_flops(copy.deepcopy(model).use_levers(Levers(fold_start=False)), 17)["Global"]
    assert fast < only_upsample < slow
    assert 0.85 < fast / slow < 0.95  # the start folds 3 of 3T taps; upsampling saves 5/9 of its convs


def peak(model, frames: int, h: int, w: int, tile: int | None = None, chunk: int = 8) -> tuple[int, int]:
    frame = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    opts = StreamOptions(chunk=chunk, tile=tile)
    with LiveTensorBytes() as enc:
        mean = torch.cat([m for m, _ in encode_frames(model, (frame for _ in range(frames)), opts)], 1)
    with LiveTensorBytes() as dec:
        for _ in decode_latents(model, [mean], opts, h, w):
            pass
    return enc.peak, dec.peak


def test_slices_cut_the_streaming_peak():
    model = random_model(**FRAME_NORM)
    sliced, whole = peak(model.use_levers(EVERY_SLICE), 17, 32, 48), peak(plain(model), 17, 32, 48)
    assert sliced[0] < 0.75 * whole[0] and sliced[1] < 0.75 * whole[1], (sliced, whole)


def test_a_video_peaks_lower_in_whole_frames_than_in_tiles():
    """Why `choose_options` keeps a video's frames whole: with the slices on, the causal caches are
    most of the peak, and tiles keep more of them (one set per tile, over the overlap). Without the
    slices, tiles are what bound a step's activations, and the encoder peaks lower tiled."""
    model = random_model(**FRAME_NORM).use_levers(EVERY_SLICE)
    whole, tiled = peak(model, 17, 128, 192, chunk=4), peak(model, 17, 128, 192, tile=64, chunk=4)
    assert whole[0] < tiled[0] and whole[1] < 0.85 * tiled[1], (whole, tiled)
    whole, tiled = peak(plain(model), 17, 128, 192, chunk=4), peak(plain(model), 17, 128, 192, tile=64, chunk=4)
    assert tiled[0] < 0.7 * whole[0], (whole, tiled)


def test_a_tiled_image_keeps_no_tile_caches():
    """An image has no next chunk: no tile keeps caches, so five tiles peak like one (plus outputs)."""
    model = random_model(**FRAME_NORM)
    one, five = peak(model, 1, 64, 64, tile=64), peak(model, 1, 64, 256, tile=64)
    assert five[0] < 1.3 * one[0] and five[1] < 1.3 * one[1], (one, five)


@pytest.mark.parametrize("levers, tile, width", [(Levers.off(), None, 48), (EVERY_SLICE, 64, 96)])
def test_the_meta_device_counts_the_bytes_the_cpu_does(levers, tile, width):
    """benchmarks/memory.py counts 720p to 4K on the meta device (shapes only): it must allocate
    what the CPU does, op by op, caches and tiles included."""
    model = random_model(**FRAME_NORM).use_levers(levers)
    with torch.device("meta"):
        meta = CausalVAE(model.config).eval().use_levers(levers)
    counts = [{k: v for k, v in measure(m, width, 32, 4, tile).items() if not k.endswith(" at")} for m in (model, meta)]
    assert counts[0] == counts[1]


def test_attention_gives_sdpa_its_4d_layout(monkeypatch):
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.ndim, q.shape[1]))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(blocks.F, "scaled_dot_product_attention", spy)
    for attention in (blocks.AttnBlock3D(32), blocks.AttnBlock3DFix(32)):
        with torch.no_grad():
            attention(torch.randn(1, 32, 3, 4, 5))
    assert seen == [(4, 1), (4, 1)]  # (batch, heads = 1, tokens, channels)


@pytest.mark.parametrize("attention", [blocks.AttnBlock3D, blocks.AttnBlock3DFix])
def test_attention_runs_a_fused_kernel_not_the_full_matrix(attention):
    """SDPA's fused kernels need each token's channels contiguous; given a strided view it falls
    back to the math path, which holds the tokens x tokens matrix: 3.9 GiB a frame in float32 at
    1080p (the encoder's mid attention, 32,400 tokens), 18 GiB measured for two frames."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    block = attention(512).eval()  # the released models' width at 1/8 resolution
    x = torch.randn(1, 512, 3, 4, 5)
    with torch.no_grad():
        with sdpa_kernel(SDPBackend.MATH):
            expected = block(x)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # the CPU's fused kernel, or "no available kernel"
            assert rel_err(block(x), expected) < 1e-5


def test_nothing_the_caller_holds_is_changed_in_place():
    from cvae_cli.stream import pixels_to_frames

    model = random_model(**FRAME_NORM)
    x, z = torch.rand(1, 3, 5, 32, 48) * 2 - 1, torch.randn(1, 4, 2, 4, 6)
    kept = x.clone(), z.clone()
    with torch.no_grad():
        model.encode(x, StreamCache())
        out = model.decode(z)
    out_kept = out.clone()
    pixels_to_frames(out, 32, 48)
    assert torch.equal(x, kept[0]) and torch.equal(z, kept[1]) and torch.equal(out, out_kept)


def test_pixels_become_minus_one_to_one_in_float32_before_the_cast():
    from cvae_cli.stream import frames_to_pixels

    frames = [np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, 2)]
    got = frames_to_pixels(frames, torch.device("cpu"), torch.bfloat16)
    exact = (torch.arange(256, dtype=torch.float64) / 127.5 - 1).to(torch.bfloat16)
    assert torch.equal(got[0, 0, 0].reshape(-1), exact)


def test_tiles_blend_in_float32():
    from cvae_cli.tiles import Tiler

    x = torch.zeros(1, 4, 1, 200, 200, dtype=torch.bfloat16)
    step = lambda tile, cache: torch.full_like(tile, 0.7)  # every tile says 0.7: so must the blend
    out = Tiler(64, 1.0, streaming=False).run(step, x, final=True)
    assert out.dtype == torch.bfloat16 and torch.equal(out, torch.full_like(out, 0.7))
