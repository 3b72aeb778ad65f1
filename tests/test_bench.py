"""`cvae bench` measures on this machine: every figure present and sane, bad options refused in one line."""
from __future__ import annotations

import json
import math

import pytest

from cvae_cli import bench
from cvae_cli.errors import CvaeError

TINY = dict(width=32, height=32, frames=5, chunk=4, repeat=1, hidden_size=32, device="cpu")


def test_bench_writes_one_sane_record_per_direction_and_variant(tmp_path):
    out = tmp_path / "bench.json"
    lines: list[str] = []
    options = bench.BenchOptions(variants=("plain", "default"), **TINY)
    bench.bench(options, out, say=lines.append)
    doc = json.loads(out.read_text())
    records = doc["records"]
    assert [(r["direction"], r["variant"]) for r in records] == [
        ("encode", "plain"), ("decode", "plain"), ("encode", "default"), ("decode", "default")]
    for r in records:
        assert r["frames"] == 5 and r["fps"] > 0 and math.isclose(r["fps"], 5 / r["seconds"])
        assert 0 < r["gflop_per_frame"] < 10 and r["tflops"] > 0
        assert 0 < r["counted_gib"] < 1 and (r["peak_gib"] is None or 0 < r["peak_gib"] < 3)
        assert math.isclose(r["tflops"], r["gflop_per_frame"] * r["fps"] / 1e3, rel_tol=1e-9)
    plain, levers = records[0], records[2]
    assert levers["gflop_per_frame"] < plain["gflop_per_frame"]  # the exact levers fold the first frame's taps
    assert records[0]["x"] == 1.0 and records[1]["x"] == 1.0  # the first variant is the reference
    assert "v1.0.0 layout, random weights" in doc["setup"] and lines[0].startswith("# ")
    assert len(lines) == 2 + len(records) and lines[2].split()[:2] == ["encode", "plain"]


@pytest.mark.parametrize("options, message", [
    (dict(config="v2"), "--config v2: use one of v1.0.0, v1.1.0"),
    (dict(width=33), "--size 33x32: width and height must be multiples of 8"),
    (dict(frames=4), "--frames 4: use 1 + 4k frames"),
    (dict(chunk=6), "--chunk 6: chunk must be a positive multiple of 4"),
    (dict(variants=("turbo",)), "variant turbo: use plain"),
])
def test_bad_options_are_refused_in_one_line(options, message):
    with pytest.raises(CvaeError, match=message.replace("+", r"\+")) as e:
        bench.BenchOptions(**{**TINY, **options})
    assert "\n" not in str(e.value)


def test_an_existing_json_is_not_written_over(tmp_path):
    out = tmp_path / "bench.json"
    out.write_text("mine")
    with pytest.raises(CvaeError, match="the file exists"):
        bench.bench(bench.BenchOptions(**TINY), out)
    assert out.read_text() == "mine"
    with pytest.raises(CvaeError, match="--size 12: expected WxH"):
        bench.parse_size("12")


def test_the_command_writes_its_json_and_refuses_bad_options_in_one_line(tmp_path):
    import subprocess

    from conftest import REPO, cvae_process

    out = tmp_path / "b.json"
    args, env = cvae_process("bench", "--size", "32x32", "--frames", "1", "--repeat", "1", "--device", "cpu",
                             "--json", out)
    done = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    records = json.loads(out.read_text())["records"]
    assert [(r["direction"], r["variant"]) for r in records] == [("encode", "default"), ("decode", "default")]
    assert all(r["fps"] > 0 and r["gflop_per_frame"] > 0 and r["counted_gib"] > 0 for r in records)
    assert "frames/s" in done.stdout
    args, env = cvae_process("bench", "--size", "33x32", "--device", "cpu")
    bad = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "error: --size 33x32: width and height must be multiples of 8"]
