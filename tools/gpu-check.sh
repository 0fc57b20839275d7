#!/usr/bin/env bash
# GPU check for a machine without Rust: runs the bundle that tools/gpu-bundle.sh built.
#   gpu-check.sh LOGDIR [BUNDLE]     (BUNDLE defaults to the folder above this script)
# In about five minutes: device info, every GPU test binary (they must not skip),
# compute-sanitizer (memcheck, and racecheck on attention) on the kernel tests,
# `dinotrain verify --device cuda`, the kernel benchmark next to PyTorch SDPA, and the full
# training step (`dinotrain bench`, ViT-S/14 and ViT-B/14) next to tools/torch_step_baseline.py;
# a short table last. Full logs go to LOGDIR. Exit status: 0 when every check passed.
set -uo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 LOGDIR [BUNDLE]" >&2
    exit 2
fi
LOGDIR="$1"
BUNDLE="${2:-$(cd "$(dirname "$0")/.." && pwd)}"
mkdir -p "$LOGDIR"
LOGDIR="$(cd "$LOGDIR" && pwd)"
SUMMARY="$LOGDIR/summary.txt"
: > "$SUMMARY"
row() { printf '%-44s %s\n' "$1" "$2" | tee -a "$SUMMARY" >/dev/null; }
failures=0
fail() { failures=$((failures + 1)); }

# --- CUDA libraries: the toolkit's, plus the PyTorch venv's cu13 folders (never CUDA 12).
libdirs=/usr/local/cuda/lib64
torch_python="${TORCH_PYTHON:-}"
if [ -z "$torch_python" ] && python3 -c 'import torch' 2>/dev/null; then
    torch_python=python3
fi
search_roots="/usr/local/lib /usr/lib/python3 /opt /root /home /venv /workspace"
if [ -n "$torch_python" ]; then
    site="$("$torch_python" -c 'import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))' 2>/dev/null)"
    search_roots="$site $search_roots"
fi
# shellcheck disable=SC2086  # word-split the roots on purpose
for lib in libcublas.so.13 libnvrtc.so.13; do
    found="$(timeout 60 find $search_roots -xdev -name "$lib" -path '*nvidia/cu13/lib/*' 2>/dev/null | head -n 1)"
    if [ -n "$found" ]; then
        libdirs="$libdirs:$(dirname "$found")"
        if [ -z "$torch_python" ]; then  # site-packages/nvidia/cu13/lib -> the venv's python
            candidate="${found%%/lib/python3*}/bin/python"
            [ -x "$candidate" ] && torch_python="$candidate"
        fi
    fi
done
# NCCL (data-parallel runs): the nvidia-nccl wheel ships libnccl.so.2; dinotrain (cudarc) opens
# libnccl.so, so a folder with that name linked to it goes on the path.
# shellcheck disable=SC2086
nccl="$(timeout 60 find $search_roots -xdev -name 'libnccl.so*' 2>/dev/null | head -n 1)"
if [ -n "$nccl" ]; then
    mkdir -p "$LOGDIR/nccl-lib"
    ln -sf "$nccl" "$LOGDIR/nccl-lib/libnccl.so"
    libdirs="$libdirs:$LOGDIR/nccl-lib"
fi
export LD_LIBRARY_PATH="$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" > "$LOGDIR/environment.txt"
echo "NCCL: ${nccl:-not found}" >> "$LOGDIR/environment.txt"
echo "torch python: ${torch_python:-none}" >> "$LOGDIR/environment.txt"

# --- 1. device
echo "== device"
nvidia-smi > "$LOGDIR/nvidia-smi.txt" 2>&1
device="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)"
echo "$device"
row "device" "${device:-unknown (nvidia-smi failed)}"

# --- 2. every GPU test binary (tests/cuda_*; the CPU tests run in CI and read fixtures by the
# build machine's paths). They print "skipping:" when they cannot use the GPU: a failure here.
echo "== tests"
for bin in "$BUNDLE"/tests/cuda_* "$BUNDLE"/tests/kernels "$BUNDLE"/tests/ssl_kernels; do
    [ -x "$bin" ] || continue
    name="$(basename "$bin")"
    [ "$name" = cuda_emulator ] && continue  # CPU-only (runs in CI), needs the sources
    log="$LOGDIR/test-$name.log"
    start=$(date +%s)
    (cd "$BUNDLE" && timeout 300 "$bin" --test-threads 1 --nocapture) > "$log" 2>&1
    rc=$?
    secs=$(( $(date +%s) - start ))
    result="$(grep -E '^test result' "$log" | tail -n 1 | sed 's/test result: //; s/; finished.*//')"
    skips="$(grep -c '^skipping:\|skipping: ' "$log")"
    status=pass
    if [ $rc -ne 0 ]; then status="FAIL (rc $rc)"; fail
    elif [ "$skips" -gt 0 ]; then status="FAIL ($skips skipped on a GPU machine)"; fail
    fi
    echo "$name: $status ${result:+- $result} (${secs}s)"
    row "test $name" "$status ${result:+($result)}"
done

# --- 3. compute-sanitizer on the kernel tests (memcheck all; racecheck the attention tiles)
echo "== compute-sanitizer"
if command -v compute-sanitizer >/dev/null 2>&1; then
    for bin in "$BUNDLE"/tests/kernels "$BUNDLE"/tests/ssl_kernels; do
        [ -x "$bin" ] || continue
        name="$(basename "$bin")"
        log="$LOGDIR/memcheck-$name.log"
        (cd "$BUNDLE" && timeout 120 compute-sanitizer --tool memcheck --error-exitcode 99 \
            "$bin" --test-threads 1) > "$log" 2>&1
        rc=$?
        errors="$(grep -Eo 'ERROR SUMMARY: [0-9]+ error' "$log" | tail -n 1)"
        # A timeout is not a memory error: say what ran before it (the budget is ~8 minutes).
        if [ $rc -eq 0 ]; then status="pass ${errors:-}"
        elif [ $rc -eq 124 ] && ! grep -q 'Invalid\|ERROR SUMMARY: [1-9]' "$log"; then
            status="timed out after 120 s, no error before ($(grep -c '\.\.\. ok' "$log") tests ok)"
        else status="FAIL (rc $rc) ${errors:-}"; fail; fi
        echo "memcheck $name: $status"
        row "memcheck $name" "$status"
    done
    log="$LOGDIR/racecheck-attention.log"
    (cd "$BUNDLE" && timeout 90 compute-sanitizer --tool racecheck --error-exitcode 99 \
        "$BUNDLE/tests/kernels" --test-threads 1 attention_forward) > "$log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then status=pass
    elif [ $rc -eq 124 ] && ! grep -q 'ERROR SUMMARY: [1-9]\|Race reported' "$log"; then
        status="timed out after 90 s, no race reported before"
    else status="FAIL (rc $rc)"; fail; fi
    echo "racecheck attention: $status"
    row "racecheck attention_forward" "$status"
else
    echo "compute-sanitizer not found"
    row "compute-sanitizer" "not installed"
fi

# --- 4. golden fixtures on the CUDA backend
echo "== verify --device cuda"
log="$LOGDIR/verify-cuda.log"
(cd "$BUNDLE" && timeout 300 ./dinotrain verify golden --device cuda) > "$log" 2>&1
rc=$?
tail -n 1 "$log"
if [ $rc -eq 0 ]; then status="pass ($(tail -n 1 "$log"))"
elif grep -qiE "unsupported|not implemented" "$log"; then status="not available yet: $(grep -iE -m1 "unsupported|not implemented" "$log")"
else status="FAIL (rc $rc): $(tail -n 1 "$log")"; fail
fi
row "verify --device cuda" "$status"

# --- 5. benchmarks: the Rust kernels, then PyTorch on the same card
echo "== benchmarks"
bench_log="$LOGDIR/bench-cuda_kernels.log"
if [ -x "$BUNDLE/benches/cuda_kernels" ]; then
    (cd "$BUNDLE" && timeout 300 ./benches/cuda_kernels --bench) > "$bench_log" 2>&1 || fail
    grep -v '^RESULT' "$bench_log"
fi
sdpa_log="$LOGDIR/bench-sdpa.log"
if [ -n "$torch_python" ]; then
    timeout 300 "$torch_python" "$BUNDLE/tools/attention_baseline.py" > "$sdpa_log" 2>&1
    grep -v '^RESULT' "$sdpa_log"
else
    echo "no python with torch: SDPA baseline skipped" | tee "$sdpa_log"
fi
result_of() { grep -h "^RESULT $1 " "$bench_log" "$sdpa_log" 2>/dev/null | awk '{print $3}' | head -n 1; }
copy="$(result_of copy)"
[ -n "$copy" ] && row "copy bandwidth (GB/s)" "$copy"
for shape in vits_T257 vits_T50 vitb_T257 vitb_T50; do
    for pass in fwd fwdbwd; do
        ours="$(result_of "attention_${pass}_${shape}")"
        theirs="$(result_of "sdpa_${pass}_${shape}")"
        ratio=""
        if [ -n "$ours" ] && [ -n "$theirs" ]; then
            ratio="$(awk -v a="$ours" -v b="$theirs" 'BEGIN { printf "%.2fx SDPA", a / b }')"
        fi
        row "attention $pass $shape (TFLOP/s)" "${ours:-?} vs SDPA ${theirs:-?} ${ratio}"
    done
done
for shape in vits vitb; do
    gbs="$(result_of "layernorm_fwd_$shape")"
    [ -n "$gbs" ] && row "layernorm fwd $shape (GB/s)" "$gbs (copy $copy)"
done

# --- 6. the full training step: `dinotrain bench` next to the PyTorch DINOv2 step, same model,
# batch and crops (2 x 224 + 8 x 98 px). About 20 s per run on an H100; a failing or missing
# bench is reported and counted, but the other rows still print. Each run is bounded by what
# is left of the script's budget (GPU_CHECK_BUDGET seconds since it started, default 540, under
# the machine's 10-minute limit); a run that no longer fits is skipped with a row saying so.
# DINOTRAIN_GEMM=cublas (exported before this script) times the step without cuBLASLt.
echo "== training step"
run_limit() {  # seconds a run may take now: at most 120, and what the budget leaves
    left=$(( ${GPU_CHECK_BUDGET:-540} - SECONDS ))
    [ $left -gt 120 ] && left=120
    echo "$left"
}
STEP_BATCH="${STEP_BATCH:-64}"
STEP_STEPS="${STEP_STEPS:-10}"
STEP_WARMUP="${STEP_WARMUP:-3}"
json_get() {  # $1 = JSON file, $2 = key (nested with dots); prints nothing when absent
    python3 - "$1" "$2" <<'PY' 2>/dev/null
import json, sys
value = json.load(open(sys.argv[1]))
for part in sys.argv[2].split("."):
    value = value[part]
print(value if value is not None else "")
PY
}
fmt() {  # $1 = value, $2 = scale, $3 = decimals, $4 = suffix: value·scale, or "?" when empty
    if [ -z "$1" ]; then echo "?"; return; fi
    awk -v v="$1" -v s="$2" -v d="${3:-1}" -v suffix="${4:-}" \
        'BEGIN { f = "%." d "f%s"; printf f, v * s, suffix }'
}
for model in vits14 vitb14; do
    ours_json="$LOGDIR/bench-step-$model.json"
    torch_json="$LOGDIR/torch-step-$model.json"
    rm -f "$ours_json" "$torch_json"
    log="$LOGDIR/bench-step-$model.log"
    if [ "$(run_limit)" -lt 30 ]; then
        row "step $model" "skipped: the check's time budget is spent (${SECONDS}s)"
        continue
    fi
    (cd "$BUNDLE" && timeout "$(run_limit)" ./dinotrain bench --device cuda --model "$model" \
        --batch-size "$STEP_BATCH" --steps "$STEP_STEPS" --warmup "$STEP_WARMUP" \
        --json "$ours_json") > "$log" 2>&1
    rc=$?
    grep -v '^step ' "$log"
    ours_status=""
    if [ $rc -ne 0 ]; then
        if grep -q "not in this build" "$log"; then
            ours_status="n/a (the CUDA training step is not in this build yet)"
        else
            ours_status="FAIL (rc $rc): $(tail -n 1 "$log")"; fail
        fi
    fi
    tlog="$LOGDIR/torch-step-$model.log"
    if [ -n "$torch_python" ] && [ "$(run_limit)" -lt 30 ]; then
        echo "time budget spent: step baseline skipped" | tee "$tlog"
    elif [ -n "$torch_python" ]; then
        timeout "$(run_limit)" "$torch_python" "$BUNDLE/tools/torch_step_baseline.py" --device cuda \
            --model "$model" --batch-size "$STEP_BATCH" --steps "$STEP_STEPS" \
            --warmup "$STEP_WARMUP" --json "$torch_json" > "$tlog" 2>&1
        trc=$?
        cat "$tlog"
        [ $trc -ne 0 ] && { echo "torch step baseline failed (rc $trc)"; fail; }
    else
        echo "no python with torch: step baseline skipped" | tee "$tlog"
    fi
    ours_ips="$(json_get "$ours_json" images_per_s)"
    torch_ips="$(json_get "$torch_json" images_per_s)"
    ratio=""
    if [ -n "$ours_ips" ] && [ -n "$torch_ips" ]; then
        ratio="$(awk -v a="$ours_ips" -v b="$torch_ips" 'BEGIN { printf " = %.2fx torch", a / b }')"
    fi
    ours_cell="${ours_status:-$(fmt "$ours_ips" 1 1)}"
    row "step $model b$STEP_BATCH images/s" "dinotrain ${ours_cell:-?} vs torch $(fmt "$torch_ips" 1 1)${ratio}"
    row "step $model utilisation (989 TFLOP/s)" \
        "dinotrain $(fmt "$(json_get "$ours_json" utilisation)" 100 1 %) vs torch $(fmt "$(json_get "$torch_json" utilisation)" 100 1 %)"
    row "step $model peak memory" \
        "dinotrain $(fmt "$(json_get "$ours_json" peak_memory_bytes)" 1e-9 2 ' GB') vs torch $(fmt "$(json_get "$torch_json" peak_memory_bytes)" 1e-9 2 ' GB')"
    row "step $model kernel launches/step" "$(fmt "$(json_get "$ours_json" kernel_launches_per_step)" 1 0) besides the GEMMs"
    row "step $model GEMMs/step" \
        "$(fmt "$(json_get "$ours_json" gemms_per_step.cublaslt)" 1 0) cuBLASLt ($(fmt "$(json_get "$ours_json" gemms_per_step.fused_epilogues)" 1 0) fused bias epilogues), $(fmt "$(json_get "$ours_json" gemms_per_step.cublas)" 1 0) cuBLAS, $(fmt "$(json_get "$ours_json" gemms_per_step.separate_epilogues)" 1 0) separate, $(fmt "$(json_get "$ours_json" gemms_per_step.refused_problems)" 1 0) refused"
    row "step $model GFLOP/image (ours | torch)" \
        "$(fmt "$(json_get "$ours_json" flops_per_image)" 1e-9 1) | $(fmt "$(json_get "$torch_json" flops_per_image)" 1e-9 1)"
done

# The cuBLASLt epilogues' gain: ViT-S/14 again with every GEMM on cuBLAS and the bias passes
# separate (DINOTRAIN_GEMM=cublas), only if the budget still has room for it.
if [ "$(run_limit)" -ge 60 ]; then
    plain_json="$LOGDIR/bench-step-vits14-cublas.json"
    (cd "$BUNDLE" && DINOTRAIN_GEMM=cublas timeout "$(run_limit)" ./dinotrain bench --device cuda \
        --model vits14 --batch-size "$STEP_BATCH" --steps "$STEP_STEPS" --warmup "$STEP_WARMUP" \
        --json "$plain_json") > "$LOGDIR/bench-step-vits14-cublas.log" 2>&1
    row "step vits14 images/s, cuBLAS only" \
        "$(fmt "$(json_get "$plain_json" images_per_s)" 1 1) (vs $(fmt "$(json_get "$LOGDIR/bench-step-vits14.json" images_per_s)" 1 1) with cuBLASLt)"
else
    row "step vits14 cuBLAS only" "skipped: the check's time budget is spent (${SECONDS}s)"
fi

echo
echo "================ summary (logs in $LOGDIR) ================"
cat "$SUMMARY"
echo "failures: $failures"
[ $failures -eq 0 ]
