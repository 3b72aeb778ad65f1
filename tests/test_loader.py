"""LatentDataset: shards and latent folders back into PyTorch, every sample once per epoch across
DataLoader workers and ranks; the real `webdataset` package reads the same shards."""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from torch.utils.data import DataLoader

from cvae_cli import LatentDataset
from cvae_cli.errors import CvaeError
from cvae_cli.latents import LatentFile, LatentMeta
from cvae_cli.model import CausalVAEConfig

from conftest import cvae_process, random_model, tiny_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = json.dumps(tiny_config().to_dict()) if hasattr(CausalVAEConfig, "to_dict") else json.dumps({"embed_dim": 4})


def latent_meta(frames: int = 5, scaling_factor: float = 0.18215, source: str = "in.mp4") -> LatentMeta:
    """Metadata for (4, 2, 4, 6) latents: 5 frames of 48x32."""
    return LatentMeta(model_id="abc", model_config=CONFIG, frames=frames, height=32, width=48, padded_frames=frames,
                      padded_height=32, padded_width=48, fps=Fraction(24), source=source,
                      scaling_factor=scaling_factor)


def latent_bytes(tmp: Path, value: float, scaling_factor: float = 0.18215) -> bytes:
    """A latent file exactly as `cvae encode` writes one (LatentWriter), filled with `value`."""
    path = tmp / f"{value}.safetensors"
    LatentFile.save(path, torch.full((4, 2, 4, 6), float(value)), latent_meta(scaling_factor=scaling_factor))
    data = path.read_bytes()
    path.unlink()
    return data


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_shard(path: Path, samples: list[tuple[str, float]], scaling_factor: float = 0.18215) -> Path:
    """A WebDataset shard as `encode --shards` writes one: KEY.safetensors then KEY.json per sample."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, value in samples:
            add(tar, f"{key}.safetensors", latent_bytes(path.parent, value, scaling_factor))
            meta = {"path": f"videos/{key}.mp4", "caption": f"clip {key}", "start": 0, "end": 5, "width": 48,
                    "height": 32, "fps": 24.0, "latent_shape": [4, 2, 4, 6], "bucket": None}
            add(tar, f"{key}.json", json.dumps(meta).encode())
    return path


def make_folder(root: Path, shards: int, per_shard: int = 4) -> tuple[Path, dict[str, float]]:
    """`shards` shards of `per_shard` samples, plus what a shard folder also holds and must not be
    read: an unfinished (hidden) shard, a damaged one set aside, bookkeeping."""
    root.mkdir()
    values = {}
    for s in range(shards):
        samples = [(f"clip-{s:03d}-{k}", s * per_shard + k) for k in range(per_shard)]
        make_shard(root / f"shard-00000-{s:06d}.tar", samples)
        values.update(samples)
    make_shard(root / f".shard-00000-{shards:06d}.part.tar", [("unfinished-0", -1.0)])
    make_shard(root / f"shard-00000-{shards + 1:06d}.tar.damaged", [("damaged-0", -2.0)])
    (root / ".cvae").mkdir()
    make_shard(root / ".cvae" / "stray.tar", [("stray-0", -3.0)])
    (root / "index.jsonl").write_text("{}\n")
    (root / "shards.json").write_text("{}\n")
    return root, values


@pytest.fixture
def five(tmp_path):
    return make_folder(tmp_path / "five", 5)


@pytest.fixture
def two(tmp_path):
    return make_folder(tmp_path / "two", 2)


@pytest.fixture
def one_thread():
    """Toy-sized tensors: one thread is fastest, and spares a busy machine the threads' spin-waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def keys(items) -> list[str]:
    return [item["key"] for item in items]


def check_once(got: list[str], values: dict[str, float]) -> None:
    duplicates = [k for k, n in Counter(got).items() if n > 1]
    assert not duplicates and set(got) == set(values)


# ---------------------------------------------------------------- items

def test_items_hold_the_latent_its_meta_and_key(five):
    root, values = five
    items = list(LatentDataset(root))
    assert keys(items) == sorted(values)  # shard order, then order in the shard
    for item in items:
        assert item["latent"].shape == (4, 2, 4, 6) and item["latent"].dtype == torch.float32
        assert torch.equal(item["latent"], torch.full((4, 2, 4, 6), float(values[item["key"]])))
        assert item["meta"]["caption"] == f"clip {item['key']}" and item["meta"]["latent_shape"] == [4, 2, 4, 6]


def test_hidden_partial_and_damaged_shards_are_never_read(five, two):
    for root, values in (five, two):
        got = keys(LatentDataset(root))
        assert not {"unfinished-0", "damaged-0", "stray-0"} & set(got)
        check_once(got, values)


def test_a_list_of_shards_and_a_glob(five):
    root, values = five
    shards = sorted(root.glob("shard-*.tar"))
    assert keys(LatentDataset([str(p) for p in shards[:2]])) == sorted(values)[:8]
    assert keys(LatentDataset(root / "shard-00000-00000[34].tar")) == sorted(values)[12:]


def test_scaling_uses_the_factor_stored_in_the_latent(tmp_path):
    shard = make_shard(tmp_path / "s.tar", [("a", 2.0)], scaling_factor=0.5)
    (plain,), (scaled,) = LatentDataset(shard), LatentDataset(shard, scale=True)
    assert torch.equal(plain["latent"], torch.full((4, 2, 4, 6), 2.0))
    assert torch.equal(scaled["latent"], torch.full((4, 2, 4, 6), 1.0))


# ---------------------------------------------------------------- exactly once per epoch

@pytest.mark.parametrize("folder", ["five", "two"])  # by shard (5 >= 2), by sample (2 < 2 x 2 ranks)
def test_workers_each_sample_once(folder, request):
    root, values = request.getfixturevalue(folder)
    loader = DataLoader(LatentDataset(root), batch_size=None, num_workers=2)
    check_once(keys(loader), values)


@pytest.mark.parametrize("folder", ["five", "two"])  # 5 shards >= 4 consumers: by shard; 2 < 4: by sample
@pytest.mark.parametrize("shuffle", [0, 3])
def test_two_ranks_by_two_workers_each_sample_once(folder, shuffle, request, monkeypatch):
    root, values = request.getfixturevalue(folder)
    shares = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))  # as torchrun sets them
        monkeypatch.setenv("WORLD_SIZE", "2")
        dataset = LatentDataset(root, shuffle=shuffle, seed=7)
        got = keys(DataLoader(dataset, batch_size=None, num_workers=2))
        assert got, f"rank {rank} got nothing"
        shares.append(set(got))
        check_once(got, {k: 0 for k in got})
    assert not shares[0] & shares[1]
    check_once([k for share in shares for k in share], values)


def test_explicit_rank_and_world(two):
    root, values = two
    shares = [keys(LatentDataset(root, rank=r, world_size=3)) for r in range(3)]
    assert [len(s) for s in shares] == [3, 3, 2]  # 8 samples by position mod 3
    check_once(sum(shares, []), values)
    with pytest.raises(CvaeError, match=r"^rank 3 of world size 3: expected 0 <= rank < world size$"):
        LatentDataset(root, rank=3, world_size=3)


def test_shuffle_is_reproducible_by_seed_and_epoch(five):
    root, values = five

    def epoch(seed, e, workers=0):
        dataset = LatentDataset(root, shuffle=6, seed=seed)
        dataset.set_epoch(e)
        return keys(DataLoader(dataset, batch_size=None, num_workers=workers))

    first = epoch(1, 0)
    check_once(first, values)
    assert first != sorted(values)
    assert epoch(1, 0) == first and epoch(1, 0, workers=2) == epoch(1, 0, workers=2)
    assert epoch(1, 1) != first and epoch(2, 0) != first
    check_once(epoch(1, 1), values)


def test_bad_shuffle_is_refused(five):
    with pytest.raises(CvaeError, match=r"^shuffle=True: give the shuffle buffer's size"):
        LatentDataset(five[0], shuffle=True)


# ---------------------------------------------------------------- a folder of latent files

def test_per_file_folder_from_encode(tmp_path, one_thread):
    """What `cvae encode --out-dir` writes (here by the library, with a tiny model): one latent per
    clip, folders mirrored, plus its bookkeeping and a killed run's hidden temporary."""
    from cvae_cli import Selection, StreamOptions, encode_many

    out = tmp_path / "latents"
    (out / "videos").mkdir(parents=True)
    jobs = [(REPO / "examples" / "cockatoo.mp4", out / "videos" / "cockatoo.safetensors",
             Selection(end=5, size=(32, 16))),
            (REPO / "examples" / "cockatoo.mp4", out / "later.safetensors", Selection(start=8, end=17, size=(32, 16)))]
    outcomes = list(encode_many(random_model(), jobs, StreamOptions(chunk=4)))
    assert not [o for _, o in outcomes if isinstance(o, Exception)]
    (out / "summary.json").write_text("{}")
    (out / ".later.safetensors.x1y2.tmp").write_bytes(b"half a file")

    items = {item["key"]: item for item in LatentDataset(out, scale=True)}
    assert sorted(items) == ["later", "videos/cockatoo"]
    first = LatentFile.open(out / "videos" / "cockatoo.safetensors")
    assert torch.equal(items["videos/cockatoo"]["latent"], first.read() * first.meta.scaling_factor)
    assert items["videos/cockatoo"]["meta"] == {
        "path": "cockatoo.mp4", "file": "videos/cockatoo.safetensors", "frames": 5, "width": 32, "height": 16,
        "fps": 20.0, "latent_shape": [4, 2, 2, 4]}
    assert items["later"]["latent"].shape == (4, 3, 2, 4)
    loader = DataLoader(LatentDataset(out), batch_size=None, num_workers=2)
    check_once(keys(loader), items)


# ---------------------------------------------------------------- nothing half-read

def cuts(shard: Path) -> dict[str, int]:
    """Where to cut a shard: inside a member's data, inside a header, and at a member boundary
    (every member whole, the end-of-archive marker gone)."""
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    last = members[-1]
    return {"in data": members[3].offset_data + 100, "in a header": members[4].offset + 200,
            "at a member boundary": last.offset_data + last.size + (-last.size % 512)}


@pytest.mark.parametrize("where", ["in data", "in a header", "at a member boundary"])
def test_a_shard_cut_short_is_refused_before_any_of_its_samples(five, tmp_path, where):
    root, _ = five
    shard = root / "shard-00000-000001.tar"
    data = shard.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: cuts(shard)[where]])
    given = []
    with pytest.raises(CvaeError) as e:
        for item in LatentDataset(cut):
            given.append(item)
    assert given == []
    assert re.fullmatch(rf"{re.escape(str(cut))} is cut short: .+", str(e.value)) and "\n" not in str(e.value)


def test_a_damaged_latent_inside_a_shard_is_one_line(tmp_path):
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        add(tar, "a.safetensors", b"not a safetensors file")
        add(tar, "a.json", b"{}")
    with pytest.raises(CvaeError, match=rf"^{re.escape(str(shard))}: a.safetensors is not a readable safetensors"):
        list(LatentDataset(shard))
    with tarfile.open(shard, "w") as tar:
        add(tar, "a.json", b"{}")
    with pytest.raises(CvaeError, match=rf"^{re.escape(str(shard))}: sample a has no a.safetensors$"):
        list(LatentDataset(shard))


def test_nothing_to_read_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CvaeError, match=r"holds no shards \(\*\.tar\) and no latent files"):
        LatentDataset(tmp_path / "empty")
    with pytest.raises(CvaeError, match=r"^no such file: "):
        LatentDataset([tmp_path / "missing.tar"])


# ---------------------------------------------------------------- the webdataset package

def test_webdataset_reads_the_same_shards(five):
    import webdataset as wds

    root, values = five
    ours = {item["key"]: item for item in LatentDataset(root)}
    theirs = {}
    for sample in wds.WebDataset([str(p) for p in sorted(root.glob("shard-*.tar"))], shardshuffle=False):
        theirs[sample["__key__"]] = (load_safetensors(sample["safetensors"])["latent"], json.loads(sample["json"]))
    assert sorted(theirs) == sorted(ours) == sorted(values)
    for key, (latent, meta) in theirs.items():
        assert torch.equal(latent, ours[key]["latent"]) and meta == ours[key]["meta"]


# ---------------------------------------------------------------- the README's snippet

def readme_blocks() -> list[str]:
    """The README's loader snippet and its webdataset snippet (README.loader.md until it is placed)."""
    blocks = [b for p in (REPO / "README.md", REPO / "README.loader.md") if p.is_file()
              for b in re.findall(r"```python\n(.*?)```", p.read_text(), re.S)]
    ours = [b for b in blocks if "LatentDataset(" in b]
    theirs = [b for b in blocks if "wds.WebDataset(" in b]
    assert len(ours) == 1 and len(theirs) == 1, "the README shows LatentDataset and webdataset once each"
    return [ours[0], theirs[0]]


def test_readme_snippets_run(five, tmp_path, monkeypatch, one_thread):
    """The README's two snippets, as written, on a shard folder named as they name it."""
    root, values = five
    monkeypatch.chdir(tmp_path)
    root.rename(tmp_path / "latents")
    ours, theirs = readme_blocks()
    scope: dict = {}
    exec(compile(ours, "README: LatentDataset", "exec"), scope)
    assert scope["step"] == 2 * (3 + 2)  # 2 epochs; worker 0 reads shards 0, 2, 4 (3 batches), worker 1 shards 1, 3
    scope = {}
    exec(compile(theirs, "README: webdataset", "exec"), scope)
    assert scope["sample"]["latent"].shape == (4, 2, 4, 6)


RANK_SCRIPT = """
import json, os, sys
import torch.distributed as dist
from torch.utils.data import DataLoader
from cvae_cli import LatentDataset

dist.init_process_group("gloo")
os.environ["RANK"] = "0"  # torch.distributed, once initialised, decides: not the environment
data = LatentDataset(sys.argv[1], shuffle=4, seed=3)
data.set_epoch(1)
keys = [item["key"] for item in DataLoader(data, batch_size=None, num_workers=2)]
with open(f"{sys.argv[2]}.{dist.get_rank()}", "w") as f:
    json.dump(keys, f)
dist.destroy_process_group()
"""


@pytest.mark.skipif(os.environ.get("CVAE_SLOW_TESTS") != "1", reason="starts torchrun and two ranks: ~15 s on "
                    "2 busy CPU cores; set CVAE_SLOW_TESTS=1 (the ranks simulated by RANK/WORLD_SIZE run always)")
def test_torchrun_ranks_each_sample_once(two, tmp_path):
    """Two ranks under torchrun (gloo), two workers each, fewer shards than readers: by sample."""
    import subprocess

    root, values = two
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    command, env = cvae_process(torchrun=2)
    command = command[: command.index("-m", 2)] + [str(script), str(root), str(tmp_path / "keys")]
    run = subprocess.run(command, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    shares = [json.loads((tmp_path / f"keys.{r}").read_text()) for r in range(2)]
    assert all(shares) and not set(shares[0]) & set(shares[1])
    check_once(shares[0] + shares[1], values)


def test_the_loader_needs_no_model_and_no_command_line():
    import ast

    import cvae_cli.loader

    tree = ast.parse(Path(cvae_cli.loader.__file__).read_text())
    local = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
    outside = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    outside |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
    assert local == {"errors", "latents"}
    assert outside <= {"__future__", "dataclasses", "glob", "json", "os", "pathlib", "random", "tarfile", "torch",
                       "typing"}


def test_reads_what_the_shard_writer_writes(tmp_path):
    """The loader and `encode --shards`' writer agree on the format (runs once cvae_cli.shards exists)."""
    shards = pytest.importorskip("cvae_cli.shards", reason="cvae_cli.shards (the writer) is not merged yet")
    out, scratch = tmp_path / "latents", tmp_path / "one.safetensors"
    out.mkdir()
    with shards.ShardWriter(out, rank=0, size=3) as writer:
        for k in range(7):
            LatentFile.save(scratch, torch.full((4, 2, 4, 6), float(k)), latent_meta())
            writer.add(f"clip_{k:03d}", scratch, {"caption": f"clip {k}", "start": 0, "end": 5})
    items = list(DataLoader(LatentDataset(out), batch_size=None, num_workers=2))
    assert sorted((i["key"], float(i["latent"].mean()), i["meta"]["caption"]) for i in items) == \
        [(f"clip_{k:03d}", float(k), f"clip {k}") for k in range(7)]
