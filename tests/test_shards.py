"""WebDataset shards from real media: what a sample holds, resuming after SIGKILL, a shard cut short,
settings refused, the real `webdataset` reader, and two torchrun ranks equal to one process."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cvae_cli import shards
from cvae_cli.checkpoints import save_model
from cvae_cli.cli import app
from cvae_cli.errors import CvaeError
from cvae_cli.latents import LatentFile
from conftest import REPO, cvae_process, kill_when_reading, random_model, wait_for

runner = CliRunner()
COCKATOO, COFFEE = REPO / "examples" / "cockatoo.mp4", REPO / "examples" / "coffee.jpg"  # 41 frames at 20 fps; 600x400
# cockatoo: clips at 0, 12, 24, 36; its row from frame 38 has 3 frames: too short; coffee: one sample
KEYS = ["cockatoo_000000", "cockatoo_000012", "cockatoo_000024", "cockatoo_000036", "coffee"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for src in (COCKATOO, COFFEE):
        (root / src.name).symlink_to(src)
    (root / "m.jsonl").write_text('{"path": "cockatoo.mp4", "caption": "a cockatoo", "source": "examples"}\n'
                                  '{"path": "coffee.jpg", "caption": "coffee", "score": 3}\n'
                                  '{"path": "cockatoo.mp4", "start": 38, "caption": "the end", "output": "end"}\n')
    return root


def args(data: Path, out: Path, weights: Path, *extra) -> list[str]:
    return [str(a) for a in ["encode", "--manifest", data / "m.jsonl", "--out-dir", out, "-w", weights,
                             "--device", "cpu", "--chunk", "4", "--clip-frames", 5, "--clip-stride", 12, *extra]]


SHARDED = ["--shards", "--shard-size", 2, "--buckets", "32x32,48x32,32x48"]


def samples(folder: Path) -> list[tuple[str, bytes, dict]]:
    """Every (key, KEY.safetensors, KEY.json) in the finished shards, in order."""
    out = []
    for path in shards.shard_files(folder):
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for name in members:
            if name.endswith(".json"):
                key = name[: -len(".json")]
                out.append((key, members[f"{key}.safetensors"], json.loads(members[name])))
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, data, weights, ) -> Path:
    out = tmp_path_factory.mktemp("sharded") / "out"
    r = runner.invoke(app, args(data, out, weights, *SHARDED, "--batch-size", 2))
    assert r.exit_code == 0, r.output
    return out


def test_a_sample_is_the_latent_file_encode_writes_and_its_row(sharded, data, weights, tmp_path, monkeypatch):
    from cvae_cli import convert

    assert [p.name for p in shards.shard_files(sharded)] == [f"shard-00000-00000{n}.tar" for n in range(3)]
    got = samples(sharded)
    assert [k for k, _, _ in got] == KEYS
    # the same samples as files, batched the same way: a shard member is that file, byte for byte
    batches = []
    real = convert.encode_batch
    monkeypatch.setattr(convert, "encode_batch",
                        lambda model, clips, *a, **k: batches.append(len(clips)) or real(model, clips, *a, **k))
    r = runner.invoke(app, args(data, tmp_path / "files", weights, "--buckets", "32x32,48x32,32x48", "--batch-size", 2))
    assert r.exit_code == 0, r.output
    assert batches == [2, 2, 1]  # one bucket (48x32): batched along B
    for key, latent, meta in got:
        assert latent == (tmp_path / "files" / f"{key}.safetensors").read_bytes(), key
    metas = {k: m for k, _, m in got}
    assert metas["cockatoo_000012"] == {"path": "cockatoo.mp4", "caption": "a cockatoo", "source": "examples",
                                        "start": 12, "end": 17, "width": 48, "height": 32, "fps": 20.0,
                                        "latent_shape": [4, 2, 4, 6], "bucket": "48x32"}
    assert metas["coffee"] == {"path": "coffee.jpg", "caption": "coffee", "score": 3, "start": 0, "end": 1,
                               "width": 48, "height": 32, "fps": None, "latent_shape": [4, 1, 4, 6], "bucket": "48x32"}
    index = [json.loads(line) for line in (sharded / "index.jsonl").read_text().splitlines()]
    assert [(r["key"], r["shard"], r["position"], r["row"], r["clip"], r["frames"]) for r in index] == [
        ("cockatoo_000000", "shard-00000-000000.tar", 0, 0, 0, 5), ("cockatoo_000012", "shard-00000-000000.tar", 1, 0, 1, 5),
        ("cockatoo_000024", "shard-00000-000001.tar", 0, 0, 2, 5), ("cockatoo_000036", "shard-00000-000001.tar", 1, 0, 3, 5),
        ("coffee", "shard-00000-000002.tar", 0, 1, 0, 1)]
    assert index[0]["latent_shape"] == [4, 2, 4, 6]
    skipped = [json.loads(line) for line in (sharded / "skipped.jsonl").read_text().splitlines()]
    assert [(s["line"], s["reason"]) for s in skipped] == [
        (3, f"{data / 'cockatoo.mp4'}: 3 frames (after --fps) in [38, 41), fewer than --clip-frames 5")]
    summary = json.loads((sharded / "summary.json").read_text())
    assert (summary["clips"], summary["done"], summary["too_short"], summary["failed"]) == (5, 5, 1, 0)
    assert (sharded / "failures.jsonl").read_text() == ""
    # extracted, a member decodes with `cvae decode`
    (tmp_path / "one.safetensors").write_bytes(got[1][1])
    r = runner.invoke(app, ["decode", str(tmp_path / "one.safetensors"), "-w", str(weights), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert LatentFile.open(tmp_path / "one.safetensors").meta.frames == 5 and (tmp_path / "one.decoded.mp4").is_file()


def test_a_finished_run_run_again_does_nothing(sharded, data, weights, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(sharded, out)
    before = {p: p.stat().st_mtime_ns for p in shards.shard_files(out)}
    r = runner.invoke(app, args(data, out, weights, *SHARDED))
    assert r.exit_code == 0 and "0 done, 5 skipped, 0 failed, 1 too short" in r.output, r.output
    assert {p: p.stat().st_mtime_ns for p in shards.shard_files(out)} == before
    r = runner.invoke(app, args(data, out, weights, *SHARDED, "--dry-run"))
    assert r.exit_code == 0 and r.output.count("(complete)") == 5 and "leave   " in r.output, r.output


def test_the_webdataset_package_reads_the_shards(sharded):
    import torch
    import webdataset as wds
    from safetensors.torch import load

    urls = [str(p) for p in shards.shard_files(sharded)]
    got = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert [s["__key__"] for s in got] == KEYS
    for s in got:
        latent = load(s["safetensors"])["latent"]
        assert list(latent.shape) == s["json"]["latent_shape"] and torch.isfinite(latent).all()
    assert got[4]["json"]["caption"] == "coffee"


def test_a_shard_cut_short_is_never_read_as_one_and_its_samples_are_redone(sharded, data, weights, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(sharded, out)
    first = shards.shard_files(out)[0]
    whole = first.read_bytes()
    assert [k for k, _ in shards.read_shard(first)] == KEYS[:2]
    with tarfile.open(first) as tar:
        members = tar.getmembers()
    boundary = members[2].offset  # the second sample's header: a cut between samples
    cuts = [len(whole) - 1, len(whole) - 1024, boundary, boundary + 700, members[0].offset_data + 100, 0]
    for size in cuts + list(range(1, len(whole), 101)):  # a cut at any byte
        first.write_bytes(whole[:size])
        with pytest.raises(CvaeError, match="not a whole shard|cut short|runs past"):
            shards.read_shard(first)
    first.write_bytes(whole[:boundary])  # cut on disk after the first sample: it still lists one
    r = runner.invoke(app, args(data, out, weights, *SHARDED))
    assert r.exit_code == 0 and "2 done, 3 skipped" in r.output, r.output
    assert not first.exists() and first.with_name(first.name + ".damaged").is_file()
    keys = Counter(k for k, _, _ in samples(out))
    assert sorted(keys) == sorted(KEYS) and set(keys.values()) == {1}
    index = [json.loads(line)["key"] for line in (out / "index.jsonl").read_text().splitlines()]
    assert sorted(index) == sorted(KEYS)


@pytest.mark.parametrize("extra, message", [
    (["--shards", "--shard-size", 0], "--shard-size 0: must be at least 1"),
    (["--shards", "-o", "x.safetensors"], "--shards writes shards under --out-dir: it takes no -o"),
    (["--shard-size", 5], "--shard-size needs --shards"),
    (["--buckets", "wide"], "--buckets 'wide': expected comma-separated WxH"),
    (["--buckets", "512px", "--max-side", 64], "--buckets chooses each sample's size"),
])
def test_bad_options_are_one_line_before_any_work(data, weights, tmp_path, extra, message):
    r = runner.invoke(app, args(data, tmp_path / "out", weights, *extra))
    assert r.exit_code == 1 and message in r.output and not (tmp_path / "out").exists(), r.output


def test_shards_of_other_weights_or_settings_are_refused_unless_overwrite(sharded, data, weights, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(sharded, out)
    other = save_model(random_model(seed=3, norm="frame"), tmp_path / "other.safetensors")
    before = sorted(p.name for p in out.iterdir())
    r = runner.invoke(app, args(data, out, other, *SHARDED))
    assert r.exit_code == 1 and "holds shards made with other weights" in r.output, r.output
    r = runner.invoke(app, args(data, out, weights, "--shards", "--buckets", "32x32"))
    assert r.exit_code == 1 and "holds shards made with other cutting" in r.output, r.output
    assert sorted(p.name for p in out.iterdir()) == before
    r = runner.invoke(app, args(data, out, other, *SHARDED, "--overwrite"))
    assert r.exit_code == 0 and "5 done, 0 skipped" in r.output, r.output
    assert json.loads((out / "shards.json").read_text())["weights"] != json.loads((sharded / "shards.json").read_text())["weights"]
    assert sorted(k for k, _, _ in samples(out)) == sorted(KEYS)


def test_sigkill_mid_shard_then_the_same_command_gives_every_sample_once(data, weights, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "reading"
    command = args(data, out, weights, "--shards", "--shard-size", 2, "--max-side", 32)
    # the cockatoo's one decode stops at frame 38, inside its fourth clip: the first shard
    # (clips 0 and 12) is finished, the second holds clip 24 and is not
    kill_when_reading(command, "hang:0:38", marker, "the run to reach its fourth clip")
    assert [p.name for p in shards.shard_files(out)] == ["shard-00000-000000.tar"]
    assert len(list(out.glob(".shard-00000-000001.tar.*.part.tar"))) == 1  # the unfinished one
    kept = shards.shard_files(out)[0]
    stamp = (kept.stat().st_ino, kept.stat().st_mtime_ns)
    shards.journal_path(out, 0).unlink()  # as if killed between the rename and the journal line

    cmd, env = cvae_process(*command)
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "3 done, 2 skipped, 0 failed, 1 too short" in r.stderr
    assert (kept.stat().st_ino, kept.stat().st_mtime_ns) == stamp
    keys = Counter(k for k, _, _ in samples(out))
    assert sorted(keys) == sorted(KEYS) and set(keys.values()) == {1}
    assert not list(out.glob(".shard-*")) and not list((out / ".cvae").glob("work.*"))


def test_two_ranks_under_torchrun_equal_one_process_sample_for_sample(data, weights, tmp_path):
    command = ["--shards", "--shard-size", 2, "--max-side", 32]
    cmd, env = cvae_process(*args(data, tmp_path / "one", weights, *command))
    single = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    cmd, env = cvae_process(*args(data, tmp_path / "two", weights, *command), torchrun=2)
    multi = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stderr
    one, two = samples(tmp_path / "one"), samples(tmp_path / "two")
    assert sorted(k for k, _, _ in two) == sorted(KEYS) and sorted(one) == sorted(two)
    assert {p.name[:11] for p in shards.shard_files(tmp_path / "two")} == {"shard-00000", "shard-00001"}
    index = [json.loads(line) for line in (tmp_path / "two" / "index.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in index) == sorted(KEYS)
    for row in index:  # the index says where each sample is
        assert row["key"] in [k for k, _ in shards.read_shard(tmp_path / "two" / row["shard"])]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (summary["done"], summary["too_short"], summary["world_size"]) == (5, 1, 2)


def test_sigterm_finishes_the_shard_in_progress_with_its_whole_samples(data, weights, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "reading"
    command = args(data, out, weights, "--shards", "--shard-size", 2, "--max-side", 32)
    cmd, env = cvae_process(*command, inject=f"hang:0:38:{marker}")
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: marker.exists() or proc.poll() is not None, "the run to reach its fourth clip")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert [k for k, _, _ in samples(out)] == KEYS[:3]  # clip 24 alone in the second shard, finished
    assert [p.name for p in shards.shard_files(out)] == ["shard-00000-000000.tar", "shard-00000-000001.tar"]
    assert not list(out.glob(".shard-*"))
    cmd, env = cvae_process(*command)
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "2 done, 3 skipped" in r.stderr, r.stderr
    assert sorted(k for k, _, _ in samples(out)) == sorted(KEYS)


def test_latent_dataset_reads_the_shards_and_refuses_one_cut_short(sharded, tmp_path):
    from cvae_cli import LatentDataset

    items = list(LatentDataset(sharded))
    assert sorted(item["key"] for item in items) == sorted(KEYS)
    assert all(list(item["latent"].shape) == item["meta"]["latent_shape"] for item in items)
    out = tmp_path / "out"
    shutil.copytree(sharded, out)
    first = shards.shard_files(out)[0]
    with tarfile.open(first) as tar:
        last = tar.getmembers()[-1]
    first.write_bytes(first.read_bytes()[: last.offset_data + last.size // 2])  # into the last member
    with pytest.raises(CvaeError):
        list(LatentDataset(first))
