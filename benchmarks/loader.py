"""Two costs of issue 18/21's reading side, each against its alternative in the same run, interleaved:

1. `media.probe` of a video whose container states no length (MPEG-2 program stream): with the
   packet count against without it, and against decoding the whole video.
2. `LatentDataset` over tar shards against `webdataset` + safetensors on the same shards.

    python benchmarks/loader.py [VIDEO]   # default: examples/cockatoo.mp4 re-encoded to MPEG-2 .mpg
"""
from __future__ import annotations

import io
import json
import sys
import tarfile
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cvae_cli import LatentDataset, media  # noqa: E402
from cvae_cli.latents import LatentFile, LatentMeta  # noqa: E402


def to_mpeg2(src: Path, dst: Path) -> Path:
    with av.open(str(src)) as i, av.open(str(dst), "w", format="mpeg") as o:
        s = i.streams.video[0]
        out = o.add_stream("mpeg2video", rate=25)
        out.width, out.height, out.pix_fmt = s.width - s.width % 2, s.height - s.height % 2, "yuv420p"
        for frame in i.decode(s):
            a = frame.to_ndarray(format="rgb24")[: out.height, : out.width]
            for p in out.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                o.mux(p)
        for p in out.encode(None):
            o.mux(p)
    return dst


def best(f, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def probe_costs(video: Path) -> None:
    real = media._count_packets
    counted = media.probe(video)
    rows = {"probe, counting packets": [], "probe, no count": [], "decode every frame": []}
    for _ in range(5):  # interleaved
        media._count_packets = real
        rows["probe, counting packets"].append(best(lambda: media.probe(video), 1))
        media._count_packets = lambda path, index: 0
        rows["probe, no count"].append(best(lambda: media.probe(video), 1))
        media._count_packets = real
        rows["decode every frame"].append(best(lambda: sum(1 for _ in media.read_frames(video)), 1))
    print(f"{video.name}: {counted.frame_count} frames ({counted.frames_from}), {counted.width}x{counted.height}, "
          f"{video.stat().st_size / 1e6:.1f} MB")
    for name, times in rows.items():
        print(f"  {name:26s} {min(times) * 1e3:9.1f} ms")


def make_shards(root: Path, shards: int, per_shard: int, shape=(4, 5, 32, 32)) -> None:
    config = json.dumps({"embed_dim": 4})
    meta = LatentMeta(model_id="x", model_config=config, frames=17, height=256, width=256, padded_frames=17,
                      padded_height=256, padded_width=256, fps=Fraction(24), source="x.mp4")
    scratch = root / "one.safetensors"
    for s in range(shards):
        with tarfile.open(root / f"shard-00000-{s:06d}.tar", "w", format=tarfile.PAX_FORMAT) as tar:
            for k in range(per_shard):
                LatentFile.save(scratch, torch.randn(shape), meta)
                for name, data in ((f"s{s}-{k}.safetensors", scratch.read_bytes()),
                                   (f"s{s}-{k}.json", json.dumps({"caption": "x", "latent_shape": list(shape)}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    scratch.unlink()


def loader_costs(root: Path) -> None:
    import webdataset as wds
    from safetensors.torch import load

    urls = [str(p) for p in sorted(root.glob("shard-*.tar"))]

    def ours():
        return sum(1 for _ in LatentDataset(root))

    def theirs():
        return sum(1 for _ in wds.WebDataset(urls, shardshuffle=False).map(
            lambda s: (load(s["safetensors"])["latent"], json.loads(s["json"]))))

    n = ours()
    assert theirs() == n
    rows = {"LatentDataset": [], "webdataset + safetensors": []}
    for _ in range(3):  # interleaved
        rows["LatentDataset"].append(best(ours, 1))
        rows["webdataset + safetensors"].append(best(theirs, 1))
    print(f"{n} samples of (4, 5, 32, 32) float32 in {len(urls)} shards, one process")
    for name, times in rows.items():
        print(f"  {name:26s} {n / min(times):9.0f} samples/s")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        video = Path(sys.argv[1]) if len(sys.argv) > 1 else to_mpeg2(REPO / "examples" / "cockatoo.mp4",
                                                                       tmp / "cockatoo.mpg")
        probe_costs(video)
        make_shards(tmp, shards=8, per_shard=250)
        loader_costs(tmp)


if __name__ == "__main__":
    main()
