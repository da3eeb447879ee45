#!/usr/bin/env bash
# The GPU check of issue 30 in one go, on one CUDA machine (the lent H200), in well under 7 minutes:
#   setup   the carried wheels (.whl/) installed beside the machine's own torch, versions, a bf16 matmul rate,
#           a local Parquet corpus (benchmarks/gpu_corpus.py)
#   pytest  python -m pytest -m gpu tests/test_gpu.py (the CUDA tests, -rA)
#   train   GPT-2 124M at context 1024 through train.py (experiment=gpt2_124m_fineweb on one GPU, the local
#           corpus): eager and compiled, vocabulary 50,257 and 50,304; tokens/s and MFU from metrics.csv
#   bench   python -m gptexp bench preset=gpu device=cuda precision=bf16 (gptexp beside HF transformers)
#   profile benchmarks/gpu_profile.py: the compiled 124M step outside Lightning, and where its time goes
#   benchc  the bench's GPT-2 124M training case compiled (gptexp and HF), if time is left
#
#   bash benchmarks/gpu_check.sh            # device tool: command "bash benchmarks/gpu_check.sh", carry [".whl"]
#                                           # (and ".whl-bnb" for bitsandbytes: the QLoRA test runs instead of skipping)
# The wheels, made beforehand on the CPU machine (both folders listed in .git/info/exclude; the image has torch 2.11,
# lightning, transformers, peft, tiktoken, sentencepiece, pyarrow, pandas and pytest): for each of hydra-core==1.3.8
# omegaconf==2.3.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0 plotnine==0.15.9
# mizani==0.14.6 (and bitsandbytes==0.50.2 into .whl-bnb), `python3 -m pip download --no-deps --only-binary=:all:
# --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 -d .whl NAME==VERSION`;
# antlr4-python3-runtime==4.9.3 has no wheel on PyPI: `pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3`.
#
# Each stage runs under `timeout`; a stage starts only while the time budget (GPU_CHECK_BUDGET_S, default 400 s
# from the start) leaves it its minimum, and is cut at the budget's end, so a hung stage cannot eat the lease and
# a failed one does not stop the next. STAGES="pytest train" runs some of them (setup always runs).
# Results go to $OUT (8 files at most): summary.txt, env.txt, pytest.log, train124m.csv, bench.csv,
# bench_compiled.csv, profile.txt, logs.tar.gz (every stage's log, run directories without checkpoints,
# bench.png, profile tables); the summary is printed last.
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-400}
STAGES=" setup ${STAGES:-pytest train bench profile benchc} "
OUT=${OUT:-$ROOT/gpu-check-out}
WORK=${GPU_CHECK_WORK:-/tmp/gpu-check}
PY=${PYTHON:-python3}
STEPS=${GPU_CHECK_STEPS:-60}  # optimizer steps of each 124M run (16 x 1024 tokens each)
# the commands' settings (strings, split on spaces; no globbing)
BENCH_ARGS="preset=gpu device=cuda precision=bf16 warmup=2 repeats=5 preset.generate.gpt2_124m.kv_cache=[true]"
BENCHC_ARGS="preset=gpu device=cuda precision=bf16 compile=true memory=false warmup=3 repeats=5 \
~preset.train.gpt2_350m ~preset.train.llama_7b_width_4l ~preset.generate ~preset.finetune"
TRAIN_EXTRA=""
if [ -n "${GPU_CHECK_CPU_DRY_RUN:-}" ]; then  # the plumbing alone, on a machine without a GPU: tiny models on the CPU
  BENCH_ARGS="preset=smoke device=cpu precision=bf16 warmup=1 repeats=2 preset.generate.tiny.kv_cache=[true]"
  BENCHC_ARGS="preset=smoke device=cpu precision=bf16 memory=false warmup=1 repeats=2 ~preset.train.tiny_llama \
~preset.generate ~preset.finetune"
  TRAIN_EXTRA="trainer.accelerator=cpu trainer.precision=bf16-mixed model.compile=false model.n_layer=1 \
model.n_head=2 model.n_embd=32 model.block_size=64 data.seq_len=64 data.batch_size=4"
fi
export BENCH_ARGS BENCHC_ARGS TRAIN_EXTRA
mkdir -p "$OUT"
rm -rf "$WORK"
mkdir -p "$WORK/logs" "$WORK/runs"
export ROOT WORK PY STEPS
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export WANDB_MODE=offline WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
export GPTEXP_CACHE=$WORK/cache TORCHINDUCTOR_CACHE_DIR=$WORK/inductor  # shared by every process of the check
SUMMARY=$WORK/summary.txt
: > "$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }
elapsed() { echo $(( $(date +%s) - START )); }

# the carried wheels (packages the image lacks: .whl/), importable ahead of the image's own; gptexp from src/
# (.whl-bnb/, when carried too: bitsandbytes for the QLoRA test, 41 MiB)
WHEELS=$(compgen -G ".whl/*.whl"; compgen -G ".whl-bnb/*.whl")
if [ -z "${GPU_CHECK_CPU_DRY_RUN:-}" ] && [ -n "$WHEELS" ]; then
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $WHEELS \
    > "$WORK/logs/pip-install.log" 2>&1 || { echo "pip install of the wheels failed:"; tail -20 "$WORK/logs/pip-install.log"; }
fi
export PYTHONPATH=/tmp/site:$ROOT/src${PYTHONPATH:+:$PYTHONPATH}

collect() {  # what is done so far into $OUT (called after every stage: a cut-off run still brings its results)
  cp "$SUMMARY" "$OUT/summary.txt" 2>/dev/null
  [ -f "$WORK/logs/pytest.log" ] && cp "$WORK/logs/pytest.log" "$OUT/pytest.log"
  [ -f "$WORK/env.txt" ] && cp "$WORK/env.txt" "$OUT/env.txt"
  [ -f "$WORK/train124m.csv" ] && cp "$WORK/train124m.csv" "$OUT/train124m.csv"
  [ -f "$WORK/bench_eager/bench.csv" ] && cp "$WORK/bench_eager/bench.csv" "$OUT/bench.csv"
  [ -f "$WORK/bench_compiled/bench.csv" ] && cp "$WORK/bench_compiled/bench.csv" "$OUT/bench_compiled.csv"
  [ -f "$WORK/logs/profile.log" ] && cp "$WORK/logs/profile.log" "$OUT/profile.txt"
  tar -C "$WORK" -czf "$OUT/logs.tar.gz" --exclude='*.ckpt' --exclude='cache' --exclude='inductor' \
    --exclude='corpus' --exclude='corpus.txt' --exclude='memory_snapshot.pickle' logs runs bench_eager bench_compiled profile env.txt \
    2>/dev/null
  return 0
}

stage() {  # stage NAME MIN_SECONDS CAP_SECONDS FUNCTION: FUNCTION under timeout, its output in logs/NAME.log
  local name=$1 need=$2 cap=$3 fn=$4 left limit began rc
  case "$STAGES" in *" $name "*) ;; *) return 0 ;; esac
  left=$(( BUDGET - $(elapsed) ))
  if (( left < need )); then
    say "== $name: SKIPPED at +$(elapsed) s: $left s left of the ${BUDGET} s budget, it needs $need"
    return 0
  fi
  limit=$(( cap < left ? cap : left ))
  echo "== $name: started at +$(elapsed) s (limit $limit s)"
  began=$(date +%s)
  timeout -k 15 "$limit" bash -c "$fn" > "$WORK/logs/$name.log" 2>&1
  rc=$?
  say "== $name: rc=$rc$( ((rc == 124 || rc == 137)) && echo ' (TIMED OUT)') in $(( $(date +%s) - began )) s, at +$(elapsed) s"
  if (( rc != 0 )) && [ "$name" != pytest ]; then
    tail -n 25 "$WORK/logs/$name.log" | cut -c1-300 | sed 's/^/   | /' | tee -a "$SUMMARY"
  fi
  collect
}

setup() {
  {
    echo "## date"; date -u
    echo "## nvidia-smi"; nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv
    echo "## python"; "$PY" -VV; command -v "$PY"
    echo "## pip list"; "$PY" -m pip list 2>/dev/null
    echo "## /tmp/site"; ls /tmp/site 2>/dev/null
    echo "## nproc"; nproc; free -g 2>/dev/null
  } > "$WORK/env.txt" 2>&1
  "$PY" - <<'EOF' 2>&1 | tee -a "$WORK/env.txt"
import importlib, time
import torch
mods = {}
for name in ("torch", "triton", "lightning", "pytorch_lightning", "torchmetrics", "hydra", "omegaconf", "datasets",
             "pyarrow", "fsspec", "huggingface_hub", "transformers", "peft", "tiktoken", "sentencepiece", "numpy",
             "pandas", "plotnine", "pytest", "xdist", "bitsandbytes", "gptexp"):
    try:
        m = importlib.import_module(name)
        where = str(getattr(m, "__file__", None) or "")
        mods[name] = getattr(m, "__version__", "?") + ("" if "site-packages" in where else f" ({where.rsplit('/', 2)[0]})")
    except Exception as error:  # noqa: BLE001
        mods[name] = f"MISSING: {type(error).__name__}: {error}"[:120]
print("versions: " + "; ".join(f"{k} {v}" for k, v in mods.items()))
name = torch.cuda.get_device_name()
print(f"gpu: {name}, capability {torch.cuda.get_device_capability()}, bf16 {torch.cuda.is_bf16_supported()}, "
      f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} device(s)")
from gptexp.core.hardware import peak_flops
peak, source = peak_flops("cuda", torch.bfloat16)
a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
for _ in range(3):
    a @ b
torch.cuda.synchronize()
start = time.perf_counter()
for _ in range(10):
    a @ b
torch.cuda.synchronize()
rate = 10 * 2 * 8192**3 / (time.perf_counter() - start)
print(f"bf16 8192^3 matmul: {rate / 1e12:.0f} TFLOP/s measured; MFU divides by {peak / 1e12:.0f} ({source}): "
      f"the matmul alone reaches {100 * rate / peak:.0f}% of it")
EOF
  "$PY" benchmarks/gpu_corpus.py "$WORK/corpus" --tokens 3000000 --text "$WORK/corpus.txt"
}

run_pytest() {  # its output: logs/pytest.log (stage)
  "$PY" -m pytest -m gpu tests/test_gpu.py -rA -n "${GPU_CHECK_PYTEST_WORKERS:-8}" -p no:cacheprovider --durations=12
}

gpt2_run() {  # gpt2_run NAME COMPILE VOCAB BATCH [override ...]: experiment=gpt2_124m_fineweb on one GPU, the local corpus
  local name=$1 compile=$2 vocab=$3 batch=$4
  shift 4
  set -f
  echo "---- $name: compile=$compile vocab=$vocab batch=$batch x 1024, $STEPS steps"
  timeout -k 10 "${GPU_CHECK_RUN_CAP:-150}" "$PY" train.py experiment=gpt2_124m_fineweb $DATA_ARGS \
    data.batch_size="$batch" trainer.devices=1 trainer.strategy=auto trainer.accumulate_grad_batches=1 \
    trainer.max_steps="$STEPS" trainer.log_every_n_steps=5 optim.warmup_steps=10 model.compile="$compile" \
    model.vocab_size="$vocab" logger=csv '~callbacks.checkpoint' '~callbacks.samples' '~callbacks.resume_point' \
    "$@" $TRAIN_EXTRA hydra.run.dir="$WORK/runs/$name" > "$WORK/logs/$name.log" 2>&1
  local rc=$?
  echo "     rc=$rc; $(grep -ho 'MFU against.*' "$WORK/logs/$name.log" | head -1)"
  echo "     $(grep -hoE '(first training step|precision:|batch:) .*' "$WORK/logs/$name.log" | sort -u | \
    grep -v "${GPU_CHECK_SEEN:-^$}" | tr '\n' ';' | cut -c1-300)"
  GPU_CHECK_SEEN="precision:\|batch:"  # said once
  awk '/^time per phase/ {on = 1; next} on && NF >= 4 && $1 != "phase" {printf "%s %s, ", $1, $3} on && NF < 4 {on = 0}
       END {print ""}' "$WORK/logs/$name.log" | sed 's/^/     median ms: /'
  (( rc == 0 )) || tail -n 15 "$WORK/logs/$name.log" | cut -c1-300
}

run_train() {
  # data=hf over the Parquet corpus, as the recipe reads FineWeb-Edu; should `datasets` not load Parquet here (the
  # image's pyarrow), data=text over the same documents instead
  DATA_ARGS="data.path=null data.files=$WORK/corpus/*.parquet data.column=text data.val_fraction=0.01 \
data.val_tokens=16384"
  if ! "$PY" -c "import sys, datasets; datasets.load_dataset('parquet', data_files={'d': sys.argv[1:]}, split='d')" \
      "$WORK"/corpus/*.parquet > "$WORK/logs/datasets-probe.log" 2>&1; then
    echo "!!!! datasets cannot read the Parquet corpus here (logs/datasets-probe.log): data=text instead"
    tail -n 3 "$WORK/logs/datasets-probe.log" | cut -c1-300
    DATA_ARGS="data=text data.path=$WORK/corpus.txt data.val_fraction=0.005"
  fi
  # eager runs validate at the end (the chunked loss at context 1024); compiled ones skip it (another compilation)
  gpt2_run gpt2_124m_eager_v50257 false null 16
  gpt2_run gpt2_124m_eager_v50304 false 50304 16
  gpt2_run gpt2_124m_compiled_v50257 true null 16 trainer.limit_val_batches=0
  gpt2_run gpt2_124m_compiled_v50304 true 50304 16 trainer.limit_val_batches=0
  "$PY" - <<'EOF'
import csv, math, os, statistics
from pathlib import Path
work = Path(os.environ["WORK"])
rows = []
for run in sorted((work / "runs").iterdir()):
    path = run / "metrics.csv"
    if not path.is_file():
        rows.append({"run": run.name, "note": "no metrics.csv"})
        continue
    table = list(csv.DictReader(open(path)))
    logged = [r for r in table if r.get("perf/tokens_per_sec") and (int(float(r["step"])) + 1) % 5 == 0]
    steady = logged[2:] or logged  # the first two intervals hold the start (and the compilation)
    pick = lambda key: [float(r[key]) for r in steady if r.get(key)]
    val = [float(r["val/loss"]) for r in table if r.get("val/loss")]
    mem = [float(r[k]) for r in table for k in r if k.startswith("mem/peak_allocated") and r[k]]
    rows.append({"run": run.name, "intervals": len(steady),
                 "tokens_per_s": round(statistics.median(pick("perf/tokens_per_sec"))),
                 "tokens_per_s_best": round(max(pick("perf/tokens_per_sec"))),
                 "mfu_pct": round(100 * statistics.median(pick("perf/mfu")), 2),
                 "mfu_pct_best": round(100 * max(pick("perf/mfu")), 2),
                 "step_ms": round(statistics.median(pick("time/step_ms")), 2) if pick("time/step_ms") else "",
                 "first_interval_tokens_per_s": round(float(logged[0]["perf/tokens_per_sec"])) if logged else "",
                 "train_loss_last": round(float([r for r in table if r.get("train/loss")][-1]["train/loss"]), 3),
                 "val_loss": round(val[-1], 3) if val else "",
                 "peak_allocated_gib": round(max(mem) / 1024, 1) if mem else ""})
keys = list(dict.fromkeys(k for r in rows for k in r))
with open(work / "train124m.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, keys)
    writer.writeheader()
    writer.writerows(rows)
print("GPT-2 124M through train.py, batch 16 x 1024, medians of the intervals after the first two:")
for r in rows:
    print("  " + ", ".join(f"{k}={v}" for k, v in r.items()))
EOF
}

run_bench() {
  set -f
  "$PY" -m gptexp bench $BENCH_ARGS hydra.run.dir="$WORK/bench_eager"
}

run_profile() {  # its output: logs/profile.log (stage)
  "$PY" benchmarks/gpu_profile.py --batch 16 32 --vocab 50304 --out "$WORK/profile"
}

run_benchc() {
  set -f
  "$PY" -m gptexp bench $BENCHC_ARGS hydra.run.dir="$WORK/bench_compiled"
}

export -f setup run_pytest gpt2_run run_train run_bench run_profile run_benchc

say "gpu_check: $(date -u +%FT%TZ), budget $BUDGET s, stages:$STAGES"
stage setup 30 120 setup
grep -E "^(versions|gpu|bf16 8192)" "$WORK/logs/setup.log" | cut -c1-900 | tee -a "$SUMMARY"
tail -n 1 "$WORK/logs/setup.log" | tee -a "$SUMMARY"
stage pytest 60 210 run_pytest
stage train 100 300 run_train
stage bench 60 180 run_bench
stage profile 40 150 run_profile
stage benchc 90 240 run_benchc
nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used --format=csv >> "$WORK/env.txt" 2>&1

{
  echo
  echo "######## summary (+$(elapsed) s) ########"
  if [ -f "$WORK/logs/pytest.log" ]; then
    echo "## pytest -m gpu"
    grep -E "^(FAILED|ERROR)" "$WORK/logs/pytest.log" | cut -c1-250
    grep -E "^SKIPPED" "$WORK/logs/pytest.log" | cut -c1-160
    grep -E "^E  " "$WORK/logs/pytest.log" | head -n 30 | cut -c1-250
    grep -E "slowest|^[0-9.]+s (call|setup)" "$WORK/logs/pytest.log" | head -n 8
    tail -n 1 "$WORK/logs/pytest.log"
  fi
  if [ -f "$WORK/logs/train.log" ]; then
    echo "## train.py, GPT-2 124M"
    grep -vE "^\s*$" "$WORK/logs/train.log" | cut -c1-400
  fi
  for b in bench_eager:bench bench_compiled:benchc; do
    log=${b#*:} b=${b%:*}
    [ -f "$WORK/$b/bench.csv" ] || continue
    echo "## $b"
    "$PY" - "$WORK/$b/bench.csv" <<'EOF'
import sys
import pandas as pd
t = pd.read_csv(sys.argv[1])
cols = [c for c in ["kind", "case", "impl", "batch", "kv_cache", "method", "activation_checkpointing", "step_ms",
                    "tokens_per_s", "mfu", "peak_memory_mb", "trainable_params"] if c in t and t[c].notna().any()]
print(t[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep=""))
EOF
    grep -E "ratio" "$WORK/logs/$log.log" 2>/dev/null | grep -v INFO | sed 's/^/  /' | cut -c1-200
  done
  if [ -f "$WORK/logs/profile.log" ]; then
    echo "## profile (compiled step outside Lightning)"
    grep -vE "Warning|warn|USDT|profiler_st" "$WORK/logs/profile.log" | head -n 48 | cut -c1-150
  fi
} > "$WORK/tail.txt" 2>&1
cat "$WORK/tail.txt" >> "$SUMMARY"
collect
cat "$WORK/tail.txt"
echo "gpu_check done at +$(elapsed) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
