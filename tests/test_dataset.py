"""Dataset runs: manifests, the rank split, resuming after a kill, and two processes under torchrun."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path, PurePosixPath

import pytest
from typer.testing import CliRunner

from cvae_cli import dataset
from cvae_cli.cli import app
from cvae_cli.errors import CvaeError
from cvae_cli.latents import LatentFile
from conftest import REPO, cvae_process, kill_when_reading, make_video, rel_err

runner = CliRunner()


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Six small clips of 5 to 9 frames in nested folders, one corrupt file, and a manifest."""
    root = tmp_path_factory.mktemp("data")
    names = ["a.mp4", "b/c.mp4", "b/d.mp4", "e/f/g.mp4", "h.mp4", "i.mp4"]
    for n, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        make_video(root / name, frames=5 + (n % 3) * 2, width=64, height=48)
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    (root / "list.txt").write_text("# clips\n" + "\n".join(names[:3] + ["broken.mp4"] + names[3:]) + "\n")
    return root


def finished(folder: Path) -> list[Path]:
    """Latent files under their final names; a writer's temporaries are dotfiles that also end in
    .safetensors and may be whole but not yet renamed."""
    return sorted(p for p in folder.rglob("*.safetensors") if not p.name.startswith("."))


def outputs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in finished(folder)}


# --- library ----------------------------------------------------------------------------------

def test_manifest_formats_fields_and_mirrored_outputs(tmp_path):
    (tmp_path / "m.txt").write_text("x/a.mp4\n\n# note\nb.png\nx/a.mp4\n/abs/c.mp4\n../up.mp4\n")
    clips = dataset.read_manifest(tmp_path / "m.txt")
    assert [c.output for c in clips] == [PurePosixPath(p) for p in
                                         ("x/a.safetensors", "b.safetensors", "abs/c.safetensors",
                                          f"{tmp_path.parent.relative_to('/')}/up.safetensors")]
    assert clips[0].path == tmp_path / "x" / "a.mp4" and clips[0].line == 1
    (tmp_path / "m.csv").write_text("path,start,end,fps,size\nv.mp4,2,10,12.5,64x48\nw.mp4,,,,\n")
    v, w = dataset.read_manifest(tmp_path / "m.csv")
    assert (v.start, v.end, v.fps, v.size, v.line) == (2, 10, 12.5, (64, 48), 2)
    assert v.selection(dataset.Selection(max_side=32)).size == (64, 48) and w.selection().start == 0
    (tmp_path / "m.jsonl").write_text('{"path": "v.mp4", "end": 3, "size": [32, 16], "output": "o/v1.safetensors"}\n'
                                      '{"path": "v.mp4", "start": 3}\n')
    one, two = dataset.read_manifest(tmp_path / "m.jsonl")
    assert (one.output, one.end, one.size, two.output, two.start) == (
        PurePosixPath("o/v1.safetensors"), 3, (32, 16), PurePosixPath("v.safetensors"), 3)


@pytest.mark.parametrize("name, text, message", [
    ("bad.csv", "file\na.mp4\n", "`path` column"),
    ("bad.jsonl", '{"path": "a.mp4", "end": "x"}\n', "bad.jsonl:1"),
    ("range.csv", "path,start,end\na.mp4,5,3\n", "bad selection"),
    ("size.csv", "path,size\na.mp4,big\n", "expected WxH"),
    ("escape.jsonl", '{"path": "a.mp4", "output": "../a.safetensors"}\n', "inside --out-dir"),
    ("empty.txt", "# nothing\n", "lists no clips"),
])
def test_bad_manifests_are_one_clear_error(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(CvaeError, match=message.replace("(", r"\(")):
        dataset.read_manifest(tmp_path / name)


def test_two_rows_on_one_output_are_refused_before_work(tmp_path):
    (tmp_path / "dup.txt").write_text("a.mp4\na.mkv\n")
    with pytest.raises(CvaeError, match="lines 1 and 2 both write a.safetensors"):
        dataset.make_plan(dataset.read_manifest(tmp_path / "dup.txt"), tmp_path / "out")


def test_every_column_is_kept_as_written(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"path": "v.mp4", "caption": "a bird", "score": 0.5, "tags": ["x"]}\n'
                                      '{"path": "v.mp4", "caption": "a bird", "score": 0.5, "tags": ["x"]}\n'
                                      '{"path": "v.mp4", "caption": "another", "start": 4}\n')
    one, two = dataset.read_manifest(tmp_path / "m.jsonl")  # the exact duplicate dropped
    assert one.columns == {"path": "v.mp4", "caption": "a bird", "score": 0.5, "tags": ["x"]}
    assert two.columns == {"path": "v.mp4", "caption": "another", "start": 4} and two.start == 4
    (tmp_path / "m.csv").write_text("path,caption,end\nv.mp4, a cat ,9\n")
    assert dataset.read_manifest(tmp_path / "m.csv")[0].columns == {"path": "v.mp4", "caption": "a cat", "end": "9"}


def test_split_is_deterministic_balanced_and_complete():
    weights = [9, 1, 5, 5, 3, 7, 2, 8, 4, 6]
    owner = dataset.split(weights, 3)
    # by hand: longest first onto the least-loaded rank, a tie of loads to the lower rank
    assert owner == [0, 0, 1, 0, 2, 2, 0, 1, 1, 2]
    loads = [sum(w for w, r in zip(weights, owner) if r == rank) for rank in range(3)]
    assert sorted(loads) == [16, 17, 17]
    assert dataset.split([1, 1, 1, 1], 2) == [0, 1, 0, 1] and dataset.split([], 4) == []
    assert dataset.split([5, 5], 4) == [0, 1]


# --- the command ------------------------------------------------------------------------------

def test_jsonl_manifest_per_clip_selection_dry_run_and_skip(tmp_path, weights):
    make_video(tmp_path / "v.mp4", frames=9, width=64, height=48)
    (tmp_path / "m.jsonl").write_text(
        '{"path": "v.mp4", "start": 1, "end": 6, "size": "32x24", "output": "cut/v.safetensors"}\n'
        '{"path": "v.mp4"}\n{"path": "missing.mp4"}\n')
    args = ["encode", "--manifest", tmp_path / "m.jsonl", "--out-dir", tmp_path / "z", "-w", weights, "--chunk", "4"]
    r = runner.invoke(app, [str(a) for a in args + ["--dry-run"]])
    assert r.exit_code == 1 and r.output.count("encode ") == 2 and "start 1, end 6, size 32x24" in r.output
    assert f"missing {tmp_path / 'missing.mp4'} (line 3)" in r.output  # noticed before any work
    assert "2 to encode, 0 complete, 1 missing" in r.output
    assert not (tmp_path / "z").exists()
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 1 and "2 done, 0 skipped, 1 failed" in r.output
    cut = LatentFile.open(tmp_path / "z" / "cut" / "v.safetensors").meta
    assert (cut.frames, cut.width, cut.height) == (5, 32, 24)
    assert LatentFile.open(tmp_path / "z" / "v.safetensors").meta.frames == 9
    failures = [json.loads(line) for line in (tmp_path / "z" / "failures.jsonl").read_text().splitlines()]
    assert [(f["path"], f["line"]) for f in failures] == [(str(tmp_path / "missing.mp4"), 3)]
    r = runner.invoke(app, [str(a) for a in args + ["--dry-run"]])
    assert r.output.count("skip ") == 2 and "0 to encode, 2 complete, 1 missing" in r.output
    r = runner.invoke(app, [str(a) for a in args])
    assert "0 done, 2 skipped, 1 failed" in r.output
    summary = json.loads((tmp_path / "z" / "summary.json").read_text())
    assert (summary["clips"], summary["done"], summary["skipped"], summary["failed"]) == (3, 0, 2, 1)
    assert not (tmp_path / "z" / dataset.RUN_DIR).exists()


def test_batched_manifest_run_equals_one_by_one(tmp_path, videos, weights, monkeypatch):
    from cvae_cli import convert

    batches = []
    real = convert.encode_batch
    monkeypatch.setattr(convert, "encode_batch", lambda model, clips, *a, **k: batches.append(len(clips)) or real(model, clips, *a, **k))
    common = ["encode", "--manifest", videos / "list.txt", "-w", weights, "--device", "cpu", "--chunk", "4"]
    for folder, extra in (("one", []), ("four", ["--batch-size", "4"])):
        r = runner.invoke(app, [str(a) for a in common + ["--out-dir", tmp_path / folder] + extra])
        assert r.exit_code == 1
        summary = json.loads((tmp_path / folder / "summary.json").read_text())
        assert (summary["done"], summary["skipped"], summary["failed"], summary["frames"]) == (6, 0, 1, 42)
        failures = [json.loads(line) for line in (tmp_path / folder / "failures.jsonl").read_text().splitlines()]
        assert [f["path"] for f in failures] == [str(videos / "broken.mp4")]
    assert batches == [1] * 6 + [4, 2]  # the broken clip cannot be probed: it fails alone, before the model
    one, four = outputs(tmp_path / "one"), outputs(tmp_path / "four")
    assert one.keys() == four.keys() and len(one) == 6
    for name in one:
        a, b = LatentFile.open(tmp_path / "one" / name), LatentFile.open(tmp_path / "four" / name)
        assert a.meta == b.meta and rel_err(b.read(), a.read()) < 1e-5


def test_killed_run_resumes_without_redoing_work_or_leaving_corrupt_files(tmp_path, videos, weights):
    out, marker = tmp_path / "out", tmp_path / "reading"
    args = ["encode", "--manifest", videos / "list.txt", "--out-dir", out, "-w", weights, "--device", "cpu",
            "--chunk", "4"]
    # the third clip read (b/d.mp4) stops after 6 frames: a, b/c are done, b/d is half written
    kill_when_reading(args, "hang:2:6", marker, "the run to reach its third clip")
    first = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished(out)}
    assert sorted(first) == [out / "a.safetensors", out / "b" / "c.safetensors"]
    for p in first:
        LatentFile.open(p)  # whatever sits under a final name is complete
    assert [p.name.endswith(".latent.raw") for p in (out / "b").glob(".d.safetensors.*")] == [True]  # killed mid-clip
    planted = out / ".h.safetensors.abc123.latent.raw"  # what a kill of an earlier run left
    planted.write_bytes(b"half")

    cmd, env = cvae_process(*args)
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr  # the broken clip
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["skipped"], summary["done"], summary["failed"]) == (2, 4, 1)
    assert r.stderr.count("done ") == 4
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in first} == first  # not rewritten
    assert len(outputs(out)) == 6 and all(LatentFile.open(p) for p in out.rglob("*.safetensors"))
    assert not planted.exists() and not [p for p in out.rglob(".*") if p.is_file()]
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert len(failures) == 1 and failures[0]["path"] == str(videos / "broken.mp4")


def test_two_processes_under_torchrun_match_one_process_bit_for_bit(tmp_path, videos, weights):
    common = ["encode", "--manifest", videos / "list.txt", "-w", weights, "--device", "cpu", "--chunk", "4"]
    cmd, env = cvae_process(*common, "--out-dir", tmp_path / "one")
    single = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert single.returncode == 1, single.stderr
    cmd, env = cvae_process(*common, "--out-dir", tmp_path / "two", torchrun=2)
    multi = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert "1 clip(s) failed" in multi.stderr, multi.stderr
    one, two = outputs(tmp_path / "one"), outputs(tmp_path / "two")
    assert len(one) == 6 and one.keys() == two.keys() and one == two
    done_lines = [line for line in multi.stderr.splitlines() if line.startswith("[rank") and " done " in line]
    assert len(done_lines) == 6 and {line[:8] for line in done_lines} == {"[rank 0]", "[rank 1]"}
    for name in one:  # each clip encoded exactly once, by one rank
        assert sum(f"{tmp_path / 'two' / name} (" in line for line in done_lines) == 1
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (summary["clips"], summary["done"], summary["skipped"], summary["failed"], summary["world_size"]) == (7, 6, 0, 1, 2)
    assert [r["rank"] for r in summary["ranks"]] == [0, 1] and all(r["done"] >= 2 for r in summary["ranks"])
    assert summary["frames"] == json.loads((tmp_path / "one" / "summary.json").read_text())["frames"] == 5 * 2 + 7 * 2 + 9 * 2
    failures = [json.loads(line) for line in (tmp_path / "two" / "failures.jsonl").read_text().splitlines()]
    assert [f["path"] for f in failures] == [str(videos / "broken.mp4")]
    assert summary["frames_per_s"] > 0 and summary["seconds"] > 0
