"""The measuring callbacks on a real run (train.py, default callbacks), the allocation counter and the kept CPU peak."""

import json
import statistics

import pytest
import torch

from gptexp.core import hardware
from gptexp.core.hardware import kept_peak_flops
from gptexp.training.callbacks.memory import AllocationCounter
from training import column, metrics

PHASES = ("data", "forward", "backward", "optimizer")


def test_phase_times_add_up_to_the_step(run_dir):
    rows = metrics(run_dir)
    for row in (r for r in rows if r.get("time/step_ms")):
        phases = sum(float(row[f"time/{p}_ms"]) for p in PHASES if row.get(f"time/{p}_ms"))
        assert phases == pytest.approx(float(row["time/step_ms"]), rel=1e-6)
        assert float(row["time/forward_ms"]) > 0 and float(row["time/backward_ms"]) > 0
    assert column(rows, "time/validation_ms") and column(rows, "time/sample_ms")
    assert column(rows, "time/checkpoint_ms")
    table = (run_dir / "stdout.txt").read_text()
    assert "time per phase" in table and all(f"\n{p} " in table for p in (*PHASES, "validation", "sample"))


def test_throughput_agrees_with_the_step_time_and_mfu_is_a_fraction(run_dir):
    rows = [r for r in metrics(run_dir) if r.get("perf/tokens_per_sec")]
    assert len(rows) >= 3
    tokens_per_step = 16 * 32  # TINY: batch 16, windows of 32
    # the two callbacks' intervals are one step apart (start to start, end to end), and one step stalled by
    # other work on the machine moves a 10-step mean a lot: compare the median interval
    ratios = [float(r["perf/tokens_per_sec"]) * float(r["time/step_ms"]) / (1e3 * tokens_per_step) for r in rows]
    assert statistics.median(ratios) == pytest.approx(1, rel=0.25)
    for row in rows:
        assert float(row["perf/samples_per_sec"]) * 32 == pytest.approx(float(row["perf/tokens_per_sec"]), rel=1e-6)
        assert 0 < float(row["perf/mfu"]) < 1


def test_memory_is_logged(run_dir):
    peaks = [v for _, v in column(metrics(run_dir), "mem/peak_rss_mb")]
    assert peaks and all(100 < p < 20_000 for p in peaks)


def test_allocations_are_counted_on_sampled_steps(sweep_dir):
    rows = metrics(sweep_dir / "0")  # callbacks=all with count_every=10
    counts = [v for _, v in column(rows, "mem/allocations")]
    assert counts and statistics.median(counts) > 50
    assert all(float(r["mem/allocated_mb"]) > 0 for r in rows if r.get("mem/allocations"))


def test_samples_at_chosen_steps_and_after_validation(run_dir):
    samples = (run_dir / "samples.md").read_text()
    headings = [line for line in samples.splitlines() if line.startswith("## ")]
    assert headings[0] == "## after 5 steps"  # at_steps [5, 100, 1600]: 100 and 1600 are past this run's 40
    assert [h.split(" (")[0] for h in headings[1:]] == ["## after 20 steps", "## after 40 steps"]


def test_allocation_counter_counts_new_storage_only():
    a = torch.ones(10)
    with AllocationCounter() as counter:
        b = a + 1  # a new 40-byte tensor
        a.view(2, 5)  # a view: no allocation
        a.add_(1)  # in place: none
        torch.matmul(b.view(1, 10), torch.ones(10, 3))  # the ones (120 bytes) and the product (12 bytes)
    assert (counter.count, counter.bytes) == (3, 40 + 120 + 12)


def test_a_cpu_peak_is_measured_once_per_machine_and_the_fastest_kept(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("GPTEXP_CACHE", str(tmp_path))
    flops, source = kept_peak_flops("cpu")
    assert source.startswith("measured") and 1e9 < flops < 1e14
    key = hardware.cpu_key(torch.float32)
    assert json.loads(hardware.kept_peaks_path().read_text()) == {key: flops}
    assert kept_peak_flops("cpu") == (flops, f"the fastest 2048^3 torch.mm measured on this CPU, kept in {tmp_path}"
                                             "/cpu_peak_flops.json")
    hardware.keep_cpu_peak(torch.float32, flops / 2)  # a slower measurement leaves the peak alone
    assert kept_peak_flops("cpu")[0] == flops
    hardware.keep_cpu_peak(torch.float32, 2 * flops)
    assert kept_peak_flops("cpu")[0] == 2 * flops
    for damaged in ("{damaged", "[1, 2]"):  # measured again and rewritten
        hardware.kept_peaks_path().write_text(damaged)
        assert kept_peak_flops("cpu")[1].startswith("measured")
        assert key in json.loads(hardware.kept_peaks_path().read_text())

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("GPTEXP_CACHE", str(tmp_path / "a-file" / "cache"))  # cannot be written: measured, not raised
    assert kept_peak_flops("cpu")[1].startswith("measured")
    assert "could not keep the measured cpu peak flops" in caplog.text
