import csv
from pathlib import Path

import pytest

from training import execute

ROOT = Path(__file__).resolve().parents[1]
MEASURED = {"step_ms", "ms_per_token", "tokens_per_s", "mfu", "peak_memory_mb", "bandwidth_bound_tokens_per_s", "of_bound",
            "weight_mb_per_step", "stream_gb_s", "peak_flops"}


def test_smoke_benchmark_writes_one_row_per_implementation_and_case(tmp_path):
    result = execute("-m", "gptexp", "bench", "preset=smoke", "repeats=2", "warmup=1",
                     "quantize=[int8,int4]", "quantize_group_size=32",
                     f"hydra.run.dir={tmp_path}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    train = [(r["case"], r["impl"], r["seq_len"]) for r in rows if r["kind"] == "train" and r["precision"] == "fp32"]
    assert sorted(train) == [("tiny", "gptexp", "32"), ("tiny", "gptexp", "64"), ("tiny", "hf", "32"),
                             ("tiny", "hf", "64"), ("tiny_llama", "gptexp", "64"), ("tiny_llama", "hf", "64")]
    for kind in ("train", "generate", "finetune"):  # every case in both precisions, in one invocation
        cases = [{k: v for k, v in r.items() if k not in MEASURED} for r in rows if r["kind"] == kind]
        by_precision = {p: [{k: v for k, v in c.items() if k != "precision"} for c in cases if c["precision"] == p]
                        for p in ("fp32", "bf16")}
        assert by_precision["fp32"] and by_precision["fp32"] == by_precision["bf16"], kind
    finetune = {(r["method"], r["activation_checkpointing"]) for r in rows if r["kind"] == "finetune"}
    assert finetune == {("full", "False"), ("full", "True"), ("lora", "False"), ("lora", "True")}
    assert all(float(r["peak_memory_mb"]) > 0 for r in rows if r["kind"] != "generate")
    assert {(r["impl"], r["kv_cache"]) for r in rows if r["kind"] == "generate"} == {
        ("gptexp", "True"), ("gptexp", "False"), ("hf", "True"), ("hf", "False")}
    assert all(float(r["tokens_per_s"]) > 0 for r in rows)
    assert all(0 < float(r["mfu"]) < 1 for r in rows if r["kind"] == "train")
    peaks = {r["precision"]: float(r["peak_flops"]) for r in rows if r["precision"] in ("fp32", "bf16")}
    assert peaks["bf16"] != peaks["fp32"]  # MFU divides by the peak of the precision in use
    # a cached decoding step reads every weight at least once: it cannot beat the memory-bandwidth bound
    assert all(0 < float(r["tokens_per_s"]) < float(r["bandwidth_bound_tokens_per_s"])
               for r in rows if r["kind"] == "generate" and r["kv_cache"] == "True")
    for r in (r for r in rows if r["kind"] == "generate"):  # the streaming rate, measured beside the row, over its bytes
        assert float(r["bandwidth_bound_tokens_per_s"]) == pytest.approx(
            int(r["batch"]) * float(r["stream_gb_s"]) * 1e3 / float(r["weight_mb_per_step"]))
    assert "gptexp bf16" in result.stdout and "against hf fp32" in result.stdout
    assert "ratio" in result.stdout
    quantized = {(r["impl"], r["precision"], r["kv_cache"]) for r in rows if r["precision"] in ("int8", "int4")}
    assert quantized == {("gptexp", f, c) for f in ("int8", "int4") for c in ("True", "False")}  # gptexp alone
    read = {r["precision"]: float(r["weight_mb_per_step"]) for r in rows if r["kind"] == "generate"}
    assert read["fp32"] == pytest.approx(2 * read["bf16"]) and read["bf16"] > read["int8"] > read["int4"]
    assert "gptexp int4" in result.stdout and "of its bandwidth bound" in result.stdout
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
