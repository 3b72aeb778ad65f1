"""Latent file format: round trips, streaming writes, atomicity and one-line errors."""
import json
import struct
from fractions import Fraction

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cvae_cli.errors import CvaeError
from cvae_cli.latents import FORMAT_VERSION, LatentFile, LatentMeta, LatentWriter, check_compatible
from cvae_cli.model import CausalVAEConfig


def make_meta(t: int = 5, **kw):
    """Metadata for `t` latent frames of 8x13 (what `rand` makes): 1 + 4(t-1) frames of 100x60."""
    frames = 1 + 4 * (t - 1)
    base = dict(model_id="abc123", model_config=json.dumps({"embed_dim": 4, "z_channels": 4}),
                frames=frames, height=60, width=100, padded_frames=frames, padded_height=64,
                padded_width=104, fps=Fraction(30000, 1001), source="in.mp4")
    return LatentMeta(**{**base, **kw})


def rand(t=5, h=8, w=13, seed=0):
    return torch.randn(4, t, h, w, generator=torch.Generator().manual_seed(seed))


def test_metadata_roundtrip_is_all_strings():
    for meta in (make_meta(), make_meta(fps=None, frames=1, dtype="bfloat16", sampled=True, scaling_factor=0.5)):
        md = meta.to_metadata()
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in md.items())
        assert LatentMeta.from_metadata(md) == meta
    assert make_meta().to_metadata()["cvae.fps"] == "30000/1001"
    assert make_meta(fps=Fraction(25)).to_metadata()["cvae.fps"] == "25/1"
    assert make_meta().format_version == FORMAT_VERSION


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_roundtrip_with_logvar(tmp_path, dtype):
    tdtype = getattr(torch, dtype)
    lat, lv = rand(seed=1), rand(seed=2)
    meta = make_meta(dtype=dtype)
    f = LatentFile.save(tmp_path / "z.safetensors", lat, meta, logvar=lv)
    assert f.meta == meta and f.shape == (4, 5, 8, 13) and f.has_logvar and f.frames == 5
    again = LatentFile.open(tmp_path / "z.safetensors")
    assert again.meta == meta
    assert torch.equal(again.read(), lat.to(tdtype).float())
    assert torch.equal(again.read(tensor="logvar"), lv.to(tdtype).float())
    assert again.read(dtype=tdtype).dtype == tdtype
    # the file is plain safetensors for any other reader
    plain = load_file(tmp_path / "z.safetensors")
    assert plain["latent"].dtype == tdtype and torch.equal(plain["latent"], lat.to(tdtype))
    with safe_open(tmp_path / "z.safetensors", "pt") as st:
        assert st.metadata() == meta.to_metadata()


def test_chunked_append_equals_one_shot(tmp_path):
    lat, lv = rand(t=10, seed=3), rand(t=10, seed=4)
    meta = make_meta(10, dtype="bfloat16")
    LatentFile.save(tmp_path / "one.safetensors", lat, meta, logvar=lv)
    with LatentWriter(tmp_path / "chunks.safetensors", meta, with_logvar=True) as w:
        t0 = 0
        for n in (1, 3, 2, 4):  # uneven chunks, non-contiguous float64 input
            w.append(lat[:, t0:t0 + n].double().transpose(2, 3).contiguous().transpose(2, 3),
                     lv[:, t0:t0 + n].double())
            t0 += n
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "chunks.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunks.safetensors", "one.safetensors"]


def test_small_copy_blocks_give_same_file(tmp_path, monkeypatch):
    lat = rand(t=7, seed=5)
    LatentFile.save(tmp_path / "a.safetensors", lat, make_meta(7))
    monkeypatch.setattr("cvae_cli.latents._COPY_BLOCK_BYTES", 1)  # one frame per write
    LatentFile.save(tmp_path / "b.safetensors", lat, make_meta(7))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_iter_chunks_reconstructs(tmp_path):
    lat = rand(t=10, seed=6)
    f = LatentFile.save(tmp_path / "z.safetensors", lat, make_meta(10))
    chunks = list(f.iter_chunks(3))
    assert [c.shape[1] for c in chunks] == [3, 3, 3, 1]
    assert torch.equal(torch.cat(chunks, dim=1), lat)
    assert torch.equal(torch.cat(list(f.iter_chunks(100)), dim=1), lat)


def test_exception_leaves_nothing(tmp_path):
    target = tmp_path / "z.safetensors"
    with pytest.raises(RuntimeError):
        with LatentWriter(target, make_meta(), with_logvar=True) as w:
            w.append(rand(), rand())
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_exception_keeps_previous_file(tmp_path):
    target = tmp_path / "z.safetensors"
    LatentFile.save(target, rand(seed=7), make_meta())
    before = target.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        with LatentWriter(target, make_meta()) as w:
            w.append(rand(seed=8))
            raise KeyboardInterrupt
    assert target.read_bytes() == before and list(tmp_path.iterdir()) == [target]


def test_empty_writer_is_an_error(tmp_path):
    with pytest.raises(CvaeError, match="no latent frames"):
        with LatentWriter(tmp_path / "z.safetensors", make_meta()):
            pass
    assert list(tmp_path.iterdir()) == []


def test_append_checks_shapes(tmp_path):
    with pytest.raises(ValueError):
        with LatentWriter(tmp_path / "z.safetensors", make_meta()) as w:
            w.append(rand(h=8))
            w.append(rand(h=9))
    with pytest.raises(ValueError):
        with LatentWriter(tmp_path / "y.safetensors", make_meta()) as w:
            w.append(rand(), rand())  # logvar without with_logvar
    assert list(tmp_path.iterdir()) == []


def one_line_error(path) -> str:
    with pytest.raises(CvaeError) as e:
        LatentFile.open(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_error_missing_file(tmp_path):
    assert one_line_error(tmp_path / "nope.safetensors") == f"{tmp_path / 'nope.safetensors'} does not exist"


def test_error_random_bytes_and_truncated(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(bytes(range(256)) * 4)
    assert one_line_error(junk).startswith(f"{junk} is not a readable safetensors file: ")
    good = tmp_path / "z.safetensors"
    LatentFile.save(good, rand(), make_meta())
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    assert one_line_error(cut).startswith(f"{cut} is not a readable safetensors file: ")
    cut.write_bytes(good.read_bytes()[:5])
    assert one_line_error(cut).startswith(f"{cut} is not a readable safetensors file: ")


def test_error_not_a_latent_file(tmp_path):
    p = tmp_path / "weights.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(2, 2)}, p)
    assert one_line_error(p) == f"{p} is not a cvae latent file"
    md = make_meta().to_metadata()
    del md["cvae.height"]
    save_file({"latent": rand()}, p, metadata=md)
    assert one_line_error(p) == f"{p} is not a cvae latent file (metadata cvae.height is missing)"
    save_file({"latent": rand()}, p, metadata={**make_meta().to_metadata(), "cvae.fps": "x/y"})
    assert "cvae.fps = 'x/y' is invalid" in one_line_error(p)
    for bad in ("0,1,2", "1/0:0,1", "1/30:0,x"):
        save_file({"latent": rand()}, p, metadata={**make_meta().to_metadata(), "cvae.frame_times": bad})
        assert f"cvae.frame_times = '{bad}' is invalid" in one_line_error(p)


def test_frame_times_round_trip_exactly_and_are_optional():
    times = tuple(Fraction(n, 60) for n in (0, 2, 4, 10, 29)) + (Fraction(1001, 30000),)
    meta = make_meta(frame_times=tuple(sorted(times)))
    md = meta.to_metadata()
    assert md["cvae.frame_times"] == "1/30000:0,1000,1001,2000,5000,14500"  # one exact tick for all
    assert LatentMeta.from_metadata(md) == meta
    assert "cvae.frame_times" not in make_meta().to_metadata()  # a constant rate stores none
    assert LatentMeta.from_metadata(make_meta().to_metadata()).frame_times is None


def test_error_no_latent_tensor(tmp_path):
    p = tmp_path / "z.safetensors"
    save_file({"z": rand()}, p, metadata=make_meta().to_metadata())
    assert one_line_error(p) == f"{p} has no 'latent' tensor"


def test_error_wrong_version(tmp_path):
    p = tmp_path / "z.safetensors"
    save_file({"latent": rand()}, p, metadata={**make_meta().to_metadata(), "cvae.format_version": "2"})
    assert one_line_error(p) == f"{p}: latent format version 2 is not supported (this cvae reads 1)"


def test_error_wrong_rank_or_channels(tmp_path):
    p = tmp_path / "z.safetensors"
    save_file({"latent": torch.zeros(4, 5, 8)}, p, metadata=make_meta().to_metadata())
    assert "expected (C, T, H, W)" in one_line_error(p)
    save_file({"latent": torch.zeros(3, 5, 8, 8)}, p, metadata=make_meta().to_metadata())
    assert one_line_error(p) == f"{p}: 'latent' has 3 channels, expected 4"


def test_header_is_aligned_and_reads_logvar_absent(tmp_path):
    f = LatentFile.save(tmp_path / "z.safetensors", rand(), make_meta())
    (n,) = struct.unpack("<Q", f.path.read_bytes()[:8])
    assert n % 8 == 0 and not f.has_logvar
    with pytest.raises(CvaeError, match="no 'logvar' tensor"):
        f.read(tensor="logvar")


def test_check_compatible():
    check_compatible(make_meta(), "abc123")
    with pytest.raises(CvaeError) as e:
        check_compatible(make_meta(), "def456", where="z.safetensors")
    assert str(e.value).startswith("z.safetensors was encoded with weights abc123, but the loaded "
                                   "weights are def456 (pass --weights")
    assert "--force" in str(e.value)
    check_compatible(make_meta(), "def456", force=True)
    same = CausalVAEConfig(norm="frame", hidden_size=64, encoder_attention="AttnBlock3DFix")  # latents alike
    check_compatible(make_meta(), "def456", same, force=True)
    other = CausalVAEConfig(encoder_spatial_downsample=("SpatialDownsample2x",) * 2 + ("", ""), embed_dim=8)
    with pytest.raises(CvaeError, match=r"another architecture \(latent channels 4, not 8; space compression 8, "
                                        r"not 4\): pass the --weights that made it \(--force cannot"):
        check_compatible(make_meta(), "def456", other, where="z.safetensors", force=True)


def test_shapes_that_disagree_with_the_metadata_are_refused(tmp_path):
    p = tmp_path / "z.safetensors"
    save_file({"latent": rand(t=4)}, p, metadata=make_meta(5).to_metadata())  # 16 of 17 frames
    assert one_line_error(p) == (f"{p}: 'latent' has shape (4, 4, 8, 13), but its metadata (17 frames of 100x60) "
                                 "needs (4, 5, 8, 13)")
    save_file({"latent": rand(h=10, w=10)}, p, metadata=make_meta().to_metadata())  # 80x80, says 100x60
    assert "has shape (4, 5, 10, 10)" in one_line_error(p)
    save_file({"latent": rand()}, p, metadata={**make_meta().to_metadata(), "cvae.padded_frames": "21"})
    assert "its metadata disagrees with itself (17 frames of 100x60 pad to 17 of 104x64, not 21" in one_line_error(p)
    save_file({"latent": rand()}, p, metadata={**make_meta().to_metadata(), "cvae.frame_times": "1/30:0,1"})
    assert "lists 2 frame times for 17 frames" in one_line_error(p)


def test_nan_or_inf_latents_are_refused_when_read(tmp_path):
    lat = rand(t=6)
    lat[1, 4, 2, 3] = float("nan")
    f = LatentFile.save(tmp_path / "z.safetensors", lat, make_meta(6))
    chunks = f.iter_chunks(2)
    assert torch.equal(next(chunks), lat[:, :2]) and torch.equal(next(chunks), lat[:, 2:4])
    with pytest.raises(CvaeError, match=r"'latent' holds NaN or infinite values \(latent frames 4..5\)"):
        next(chunks)
    lat[1, 4, 2, 3] = float("inf")
    with pytest.raises(CvaeError, match="NaN or infinite"):
        LatentFile.save(tmp_path / "inf.safetensors", lat, make_meta(6)).read()
