"""bench.py --tiny runs every section on the CPU (a smoke test: no timing assertions)."""

import json

import bench


def test_tiny_benchmark_runs_every_section(tmp_path, capsys):
    results = bench.main(["--tiny", "--data-root", str(tmp_path / "data"), "--json", str(tmp_path / "b.json")])
    rows = results["rows"]
    assert not [name for name, r in rows.items() if "error" in r], rows
    sections = sorted({r["section"] for r in rows.values()})
    assert sections == ["a", "b", "c", "d", "e", "f"]
    for r in rows.values():
        if "samples_s" in r:
            assert r["samples_s"] > 0 and r["gflop_per_sample"] > 0 and 0 < r["mfu"]
            assert r["vs_tutorial"] > 0 and (r["section"] == "a" or r["vs_open_clip"] > 0)
    assert {"input pipeline, cached squares", "input pipeline, decoding JPEGs", "evaluation"} <= set(rows)
    assert json.loads((tmp_path / "b.json").read_text())["rows"].keys() == rows.keys()
    out = capsys.readouterr().out
    assert "x tutorial" in out and "x open_clip" in out and "MFU" in out
