"""bench.py --tiny runs every section on the CPU (a smoke test: no timing assertions)."""

import dataclasses
import gzip
import json

import pytest
import torch
from torch._inductor import decomposition

import bench
from engine import MAX_POOL_BACKWARD, lower_max_pool_backward


def test_tiny_benchmark_runs_every_section(tmp_path, capsys):
    results = bench.main(["--tiny", "--data-root", str(tmp_path / "data"), "--json", str(tmp_path / "b.json"),
                          "--profile", str(tmp_path / "profile")])
    rows = results["rows"]
    assert not [name for name, r in rows.items() if "error" in r], rows
    sections = sorted({r["section"] for r in rows.values()})
    assert sections == ["a", "b", "c", "d", "e", "f", "g"]
    for r in rows.values():
        if "samples_s" in r:
            assert r["samples_s"] > 0 and r["gflop_per_sample"] > 0 and 0 < r["mfu"]
            assert r["vs_tutorial"] > 0 and (r["section"] == "a" or r["vs_open_clip"] > 0)
    assert {"input pipeline, cached squares", "input pipeline, decoding JPEGs", "evaluation", "checkpoint"} <= set(rows)
    assert 0 < rows["checkpoint"]["waited_seconds"] and rows["checkpoint"]["gb"] > 0
    eager = "ours, eager, batch 16, 16 tokens, synthetic"  # packed text does less work than padded, same batch
    assert rows[eager]["gflop_per_sample"] < rows[eager + ", text padded (no packing)"]["gflop_per_sample"]
    written = json.loads((tmp_path / "b.json").read_text())
    assert written["rows"].keys() == rows.keys()
    assert list(written["section_seconds"]) == ["tutorial", "open_clip", "eager", "compile", "e2e", "pipeline", "eval",
                                                "checkpoint", "e2e_candidates", "open_clip_compiled",
                                                "tutorial_strict_fp32", "eager_padded", "e2e_eager"]
    assert all(seconds > 0 for seconds in written["section_seconds"].values())
    tables = sorted((tmp_path / "profile").glob("*.txt"))
    assert [t.stem for t in tables] == ["ours-compiled-batch-16-16-tokens-synthetic",
                                        "ours-eager-batch-16-16-tokens-synthetic"]
    for table in tables:  # the step's convolutions show up among its operators, and the trace is there
        assert "aten::convolution" in table.read_text()
        with gzip.open(table.with_suffix(".json.gz")) as trace:
            assert json.load(trace)["traceEvents"]
    out = capsys.readouterr().out
    assert "x tutorial" in out and "x open_clip" in out and "MFU" in out


def test_sweep_times_each_variant_with_its_settings_in_force(tmp_path, monkeypatch):
    """The sweep's wiring, without compiling: each variant's batch and inductor settings reach the timed step."""
    seen = []

    def fake_throughput(step, samples, sizes, device):
        decomposed = MAX_POOL_BACKWARD in decomposition.decompositions
        seen.append((samples, torch._inductor.config.conv_1x1_as_mm, decomposed,
                     torch._inductor.config.realize_reads_threshold))
        return 100.0

    monkeypatch.setattr(bench, "throughput", fake_throughput)
    built, our_model = [], bench.our_model
    monkeypatch.setattr(bench, "our_model", lambda cfg, *args: built.append(cfg) or our_model(cfg, *args))
    monkeypatch.setattr(bench, "SWEEP", [("plain", "default", {}, 1, {}),
                                         ("1x1 as mm", "default", {"conv_1x1_as_mm": True}, 2, {"dropout": 0.0}),
                                         ("pool", "default", {"max_pool_backward": "decomposed"}, 1, {}),
                                         ("inductor's", "default", bench.INDUCTOR_DEFAULTS, 1, {})])
    before = lower_max_pool_backward(True)  # as compiling on CUDA leaves it, and the threshold too
    try:
        with torch._inductor.config.patch(realize_reads_threshold=2):
            results = bench.main(["--tiny", "--sweep-only", "--data-root", str(tmp_path / "data")])
            assert MAX_POOL_BACKWARD not in decomposition.decompositions  # lowered again after the "pool" variant
            assert torch._inductor.config.realize_reads_threshold == 2  # and ours again after "inductor's"
    finally:
        lower_max_pool_backward(before)
    assert not (tmp_path / "data").exists()  # the sweep alone draws no data set
    big = bench.TINY.big_batch
    assert seen == [(big, False, False, 2), (2 * big, True, False, 2), (big, False, True, 2), (big, False, False, 4)]
    assert not torch._inductor.config.conv_1x1_as_mm  # restored afterwards

    assert [(cfg.compile, cfg.dropout) for cfg in built] == [(True, 0.1), (True, 0.0), (True, 0.1), (True, 0.1)]
    names = [name for name in results["rows"]]
    assert len(names) == 4 and names[0].endswith(", plain") and names[1].endswith(", 1x1 as mm"), names

    seen.clear()  # a torch that does not decompose max-pool's backward: the variant would compile the reference
    monkeypatch.setattr(bench, "decomposition_table", {})
    assert "sweep: pool" not in bench.main(["--tiny", "--sweep-only"])["section_seconds"]
    assert [samples for samples, *_ in seen] == [big, 2 * big, big]


def test_end_to_end_times_the_default_step_then_the_candidate_for_a_new_default(tmp_path, monkeypatch):
    """The wiring of the (d) rows, without compiling: the candidate's settings are in force for its row only."""
    seen = []

    def fake_throughput(step, samples, sizes, device, **kwargs):
        seen.append(torch._inductor.config.conv_1x1_as_mm)
        return 100.0

    monkeypatch.setattr(bench, "throughput", fake_throughput)
    monkeypatch.setattr(bench, "loader_throughput", fake_throughput)
    built, our_model = [], bench.our_model
    monkeypatch.setattr(bench, "our_model", lambda cfg, *args: built.append(cfg) or our_model(cfg, *args))
    monkeypatch.setattr(bench, "CANDIDATES", ("graphs + 1x1 as mm", {"conv_1x1_as_mm": True},
                                              {"compile_mode": "reduce-overhead"}))
    skip = ("tutorial,open_clip,eager,compile,pipeline,eval,checkpoint,open_clip_compiled,tutorial_strict_fp32,"
            "eager_padded,e2e_eager")
    results = bench.main(["--tiny", "--skip", skip, "--data-root", str(tmp_path / "data")])
    assert seen == [False, False, True, True]  # on the device, then loaded: default, then the candidate
    assert [(cfg.compile, cfg.compile_mode) for cfg in built] == [(True, "default"), (True, "reduce-overhead")]
    assert not torch._inductor.config.conv_1x1_as_mm  # restored afterwards
    assert "ours, end to end, compiled, batch 16, 16 tokens, graphs + 1x1 as mm" in results["rows"]


def test_each_contestant_runs_under_its_own_backend_settings(tmp_path, monkeypatch):
    """The tutorial leaves PyTorch's defaults (no TF32 matmuls, no cuDNN autotuning); open_clip's script and ours
    turn both on. A baseline timed with our settings would look faster than the tutorial its users run."""
    seen = []

    def fake_throughput(step, samples, sizes, device, **kwargs):
        seen.append((torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
                     torch.backends.cudnn.allow_tf32))
        return 100.0

    monkeypatch.setattr(bench, "throughput", fake_throughput)
    before = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    skip = "eager_padded,e2e_eager,pipeline,eval,checkpoint,compile,e2e,e2e_candidates,open_clip_compiled"
    bench.main(["--tiny", "--skip", skip, "--data-root", str(tmp_path / "data")])
    # tutorial, open_clip, ours, then the tutorial in strict fp32 (TF32 off for convolutions too)
    assert seen == [(False, False, True), (True, True, True), (True, True, True), (False, False, False)]
    assert (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32) == before


def test_each_row_is_compared_with_open_clip_at_its_own_batch(tmp_path, monkeypatch):
    """open_clip runs at the synthetic rows' batch and at the end-to-end rows' batch; a row at the larger batch
    must not be divided by open_clip's smaller-batch figure (larger batches run faster)."""
    monkeypatch.setattr(bench, "TINY", dataclasses.replace(bench.TINY, big_batch=2 * bench.TINY.batch))
    monkeypatch.setattr(bench, "throughput", lambda step, samples, sizes, device, **kwargs: 100.0 * samples)
    monkeypatch.setattr(bench, "SWEEP", [("default mode", "default", {}, 1, {})])  # ours at the big batch
    skip = ("tutorial,eager,compile,e2e,e2e_candidates,pipeline,eval,checkpoint,open_clip_compiled,"
            "tutorial_strict_fp32,eager_padded,e2e_eager")
    rows = bench.main(["--tiny", "--sweep", "--skip", skip, "--data-root", str(tmp_path / "data")])["rows"]
    small, big = bench.TINY.batch, 2 * bench.TINY.batch
    assert rows[f"open_clip CustomTextCLIP, float32, batch {big}"]["vs_open_clip"] == 1.0
    ours = rows[f"ours, compiled, batch {big}, {bench.TINY.tokens} tokens, synthetic, default mode"]
    assert ours["vs_open_clip"] == 1.0  # 2.0 against open_clip at batch {small}
    assert rows[f"open_clip CustomTextCLIP, float32, batch {small}"]["samples_s"] == 100.0 * small


def test_the_old_max_pool_variant_compiles_afresh_rather_than_reuse_the_cached_lowered_compile(tmp_path,
                                                                                                monkeypatch):
    """torch's AOTAutograd cache does not key on the decomposition table: with it on, the variant that times
    torch's max-pool backward would find and time the lowered compile of the same graph."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))

    def compile_and_run() -> int:
        torch._dynamo.reset()
        counters.clear()
        x = torch.randn(2, 3, 9, 9, requires_grad=True)
        torch.compile(lambda x: torch.nn.functional.max_pool2d(x, 3, 2, 1).sum())(x).backward()
        return counters["aot_autograd"]["autograd_cache_hit"]

    before = lower_max_pool_backward(True)
    try:
        compile_and_run()
        assert compile_and_run() == 1  # the lowered compile, found in the cache
        with bench.compile_settings({"max_pool_backward": "decomposed"}):
            assert compile_and_run() == 0
    finally:
        lower_max_pool_backward(before)
        torch._dynamo.reset()


def test_every_sweep_and_candidate_setting_is_one_inductor_or_bench_knows():
    """A misspelt setting would fail only on the GPU, in its minutes of compiling."""
    known = set(torch._inductor.config.get_config_copy()) | {"max_pool_backward"}
    settings = [knobs for _, _, knobs, _, _ in bench.SWEEP] + [bench.CANDIDATES[1]]
    assert all(set(knobs) <= known for knobs in settings), settings
    modes = {mode for _, mode, _, _, _ in bench.SWEEP}
    assert modes <= set(torch._inductor.list_mode_options()) | {"default"}, modes
    fields = {f.name for f in dataclasses.fields(bench.Config)}
    overrides = [o for *_, o in bench.SWEEP] + [bench.CANDIDATES[2]]
    assert all(set(o) <= fields for o in overrides), overrides


def test_sweep_first_times_the_variants_before_the_sections_a_first_call_left(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "throughput", lambda step, samples, sizes, device, **kwargs: 100.0)
    monkeypatch.setattr(bench, "SWEEP", [("default mode", "default", {}, 1, {}),
                                         ("pool", "default", {"max_pool_backward": "decomposed"}, 1, {})])
    skip = ("tutorial,open_clip,open_clip_big,compile,e2e,e2e_candidates,pipeline,eval,checkpoint,"
            "open_clip_compiled,tutorial_strict_fp32,e2e_eager")
    argv = ["--tiny", "--sweep", "--skip", skip, "--data-root", str(tmp_path / "data")]
    assert list(bench.main(argv + ["--sweep-first"])["section_seconds"]) == [
        "sweep: default mode", "sweep: pool", "eager", "eager_padded"]
    assert list(bench.main(argv)["section_seconds"]) == ["eager", "eager_padded", "sweep: default mode", "sweep: pool"]


def test_our_steps_read_the_loss_back_every_log_every_steps_as_train_py_does(monkeypatch):
    reads = []
    monkeypatch.setattr(bench, "train_step", lambda *args: torch.tensor(2.0))
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(self.clone()) or 0.0)
    cfg = bench.our_config(bench.TINY, 16, False, 16, log_every=3)
    step = bench.loop_step(None, None, None, None, cfg, torch.device("cpu"), torch.float32)
    for _ in range(7):
        step(None, None)
    assert [float(r) for r in reads] == [6.0, 6.0]  # three losses summed, then the window emptied


def test_synthetic_text_is_packed_to_a_width_fixed_for_the_run_as_train_py_packs_it():
    """train.py packs every batch to its run's fullest batch, so a synthetic batch packed to its own tokens alone
    would do less work than training does."""
    _, text = bench.synthetic_batch(64, bench.FULL, 48, torch.device("cpu"))
    real = int(text["attention_mask"].sum())
    width = text["token_index"].shape[1]
    assert width > real + 8  # more than rounding up to a multiple of 8 adds
    assert width <= 64 * 48


def test_a_failed_section_is_in_the_json_at_once(tmp_path, monkeypatch):
    """A time limit may end bench.py after any section: a failed one is saved too, so that a second call (gpu-check's
    sweep, which skips the sections the first call saved) does not run it again."""
    def broken(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(bench, "bench_eval", broken)
    skip = ("tutorial,open_clip,eager,compile,e2e,pipeline,checkpoint,e2e_candidates,open_clip_compiled,"
            "tutorial_strict_fp32,eager_padded,e2e_eager")
    bench.main(["--tiny", "--skip", skip, "--data-root", str(tmp_path / "data"), "--json", str(tmp_path / "b.json")])
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["rows"] == {"eval": {"error": "RuntimeError: out of memory"}} and list(saved["section_seconds"]) == [
        "eval"]


def test_no_sweep_label_holds_the_comma_that_separates_skip():
    assert not [label for label, *_ in bench.SWEEP if "," in label]


def test_bad_flags_are_refused_before_any_section_runs(tmp_path, monkeypatch, capsys):
    """On a lent GPU a typo costs minutes: an unknown --skip used to run the section anyway, and a --json in a folder
    that does not exist failed after the first section, losing its figures."""
    monkeypatch.setattr(bench, "matmul_peak", lambda device: pytest.fail("a section started"))
    base = ["--tiny", "--data-root", str(tmp_path / "data")]
    for argv, message in [
            (["--skip", "compile,evl"], "--skip: no section named 'evl'; the sections are tutorial, open_clip, "),
            (["--json", str(tmp_path / "missing" / "b.json")], "b.json: name a file in a folder that exists"),
            (["--device", "gpu"], "--device 'gpu' is not a device torch knows")]:
        with pytest.raises(SystemExit) as e:
            bench.main(base + argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
    # every section a first call can record is a name --skip takes (.ci/gpu-check passes them back)
    skip = ",".join(["tutorial", "open_clip", "open_clip_big", "e2e", "e2e_eager", "sweep: " + bench.SWEEP[0][0]])
    with pytest.raises(pytest.fail.Exception, match="a section started"):
        bench.main(base + ["--skip", skip])
