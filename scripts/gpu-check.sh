#!/usr/bin/env bash
# The CUDA backend on a machine with an NVIDIA GPU, in one invocation (about 8
# minutes at most on one H200):
#   1. the GPU agreement tests (every fixture case of every standard loss, loss
#      and gradients vs the interpreter, f32 relative 1e-4, run whole, lean and
#      streamed in 2-row blocks; bf16 inputs on four losses), from a prebuilt
#      test binary;
#   2. forward+gradient timings of MNRL, CoSENT, BatchHardTriplet and
#      Matryoshka(MNRL) at B in {1024, 16384, 65536}, D = 768, float32, with the
#      release binary's `lossc bench --backend cuda`, and with PyTorch eager and
#      torch.compile on inputs of the same shapes where PyTorch is installed;
#   3. one table: times, ratios to PyTorch, and peak device memory.
#
# The GPU machine needs no Rust toolchain and no network. Build on an x86-64
# machine beforehand and copy the repository with its target/ directory:
#     cargo build --release && cargo test --test cuda --no-run
# (or point LOSSC_BIN / LOSSC_TEST_BIN at the binaries). With cargo present the
# script builds what is missing itself.
#
# NVRTC: the driver must be able to load the PTX NVRTC makes, so NVRTC must not
# be newer than the driver. LOSSC_NVRTC=/path/to/libnvrtc.so.N picks one; else
# the script looks in Python's site-packages (PyTorch's nvidia-cuda-nvrtc wheel)
# and the CUDA toolkit for the driver's major version.
#
# Options (environment): SIZES="1024 16384 65536", LOSSES="...", DEADLINE_S=470,
# LOSSC_BACKEND=cuda (jit runs the plumbing on a CPU machine, for testing the
# script), NO_TORCH=1.
#
# Not run by its author: the machine it was written on has no GPU. It is
# written to keep going past any failure and to say what it skipped and why.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
START=$(date +%s)
DEADLINE_S=${DEADLINE_S:-470}
SIZES=${SIZES:-"1024 16384 65536"}
LOSSES=${LOSSES:-"MultipleNegativesRankingLoss CoSENTLoss BatchHardTripletLoss MatryoshkaLoss"}
BACKEND=${LOSSC_BACKEND:-cuda}
OUT=$(mktemp -d "${TMPDIR:-/tmp}/lossc-gpu-check.XXXXXX")
export LOSSC_REPO=$REPO
export LOSSC_CACHE_DIR=${LOSSC_CACHE_DIR:-$OUT/ptx-cache}

say() { printf '%s\n' "$*" >&2; }
left() { echo $((DEADLINE_S - ($(date +%s) - START))); }
# Runs a command with a timeout of min($1, time left - 5) seconds.
bounded() {
    local want=$1; shift
    local budget=$(( $(left) - 5 ))
    (( budget < want )) && want=$budget
    if (( want <= 0 )); then return 124; fi
    timeout --kill-after=5 "$want" "$@"
}

# ---- the machine ---------------------------------------------------------------
if command -v nvidia-smi >/dev/null 2>&1; then
    GPU=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
    DRIVER_CUDA=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\)\.\([0-9]*\).*/\1.\2/p' | head -1)
else
    GPU="(nvidia-smi not found)"
    DRIVER_CUDA=""
fi
say "gpu-check: $(date -u +%Y-%m-%dT%H:%MZ) on $(hostname): $GPU; driver CUDA ${DRIVER_CUDA:-unknown}"

# ---- NVRTC matching the driver ---------------------------------------------------
if [[ -z "${LOSSC_NVRTC:-}" ]]; then
    major=${DRIVER_CUDA%%.*}
    candidates=()
    if command -v python3 >/dev/null 2>&1; then
        while IFS= read -r dir; do
            [[ -d "$dir/nvidia" ]] || continue
            while IFS= read -r f; do candidates+=("$f"); done < <(find "$dir/nvidia" -name 'libnvrtc.so.*' ! -name '*builtins*' 2>/dev/null)
        done < <(python3 -c 'import site,sys; print("\n".join(site.getsitepackages()+[site.getusersitepackages()]))' 2>/dev/null)
    fi
    for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu; do
        while IFS= read -r f; do candidates+=("$f"); done < <(find "$d" -maxdepth 1 -name 'libnvrtc.so.*' ! -name '*builtins*' 2>/dev/null)
    done
    for f in "${candidates[@]}"; do
        if [[ -n "$major" && "$f" == *"libnvrtc.so.$major"* ]]; then LOSSC_NVRTC=$f; break; fi
    done
    if [[ -z "${LOSSC_NVRTC:-}" && ${#candidates[@]} -gt 0 ]]; then LOSSC_NVRTC=${candidates[0]}; fi
    if [[ -n "${LOSSC_NVRTC:-}" ]]; then export LOSSC_NVRTC; fi
fi
say "gpu-check: NVRTC ${LOSSC_NVRTC:-(found by name through LD_LIBRARY_PATH)}"

# ---- binaries ------------------------------------------------------------------------
LOSSC_BIN=${LOSSC_BIN:-$REPO/target/release/lossc}
if [[ ! -x "$LOSSC_BIN" ]] && command -v cargo >/dev/null 2>&1; then
    say "gpu-check: building the release binary"
    bounded 400 cargo build --release --locked >&2
fi
# The newest `cargo test --test cuda --no-run` artefact: target/*/deps/cuda-<hash>.
find_test_bin() {
    local f
    for f in $(ls -t "$REPO"/target/*/deps/cuda-* 2>/dev/null); do
        if [[ -f "$f" && -x "$f" && "$f" != *.* ]]; then echo "$f"; return; fi
    done
}
TEST_BIN=${LOSSC_TEST_BIN:-$(find_test_bin)}
if [[ -z "$TEST_BIN" ]] && command -v cargo >/dev/null 2>&1; then
    say "gpu-check: building the test binary"
    bounded 400 cargo test --locked --test cuda --no-run >&2
    TEST_BIN=$(find_test_bin)
fi

# ---- 1. agreement tests --------------------------------------------------------------
AGREEMENT="not run (no test binary: cargo test --test cuda --no-run)"
if [[ -n "$TEST_BIN" && -x "$TEST_BIN" ]]; then
    say "gpu-check: agreement tests ($TEST_BIN gpu_)"
    bounded 240 "$TEST_BIN" gpu_ --nocapture --test-threads 1 > "$OUT/agreement.log" 2>&1
    rc=$?
    tail -n 30 "$OUT/agreement.log" >&2
    if grep -q "SKIP" "$OUT/agreement.log"; then
        AGREEMENT="SKIPPED: $(grep -m1 SKIP "$OUT/agreement.log")"
    elif (( rc == 0 )); then
        AGREEMENT="passed ($(grep -m1 'fixture cases ran' "$OUT/agreement.log" || echo 'see log'))"
    elif (( rc == 124 || rc == 137 )); then
        AGREEMENT="TIMED OUT"
    else
        AGREEMENT="FAILED (exit $rc; log $OUT/agreement.log)"
    fi
fi

# ---- 2. timings ------------------------------------------------------------------------
params_of() {
    case $1 in
        MatryoshkaLoss) echo '{"loss": {"st_class": "MultipleNegativesRankingLoss", "params": {}}, "matryoshka_dims": [768, 512, 256, 128, 64]}' ;;
        *) echo '{}' ;;
    esac
}
dims_of() {
    case $1 in
        MultipleNegativesRankingLoss|MatryoshkaLoss) echo "B=$2,D=768,K=0" ;;
        *) echo "B=$2,D=768" ;;
    esac
}
field() { sed -n "s/.*\"$1\":\([-0-9.e+]*\).*/\1/p" | head -1; }
HAVE_TORCH=0
if [[ -z "${NO_TORCH:-}" ]] && command -v python3 >/dev/null 2>&1 && python3 -c 'import torch' >/dev/null 2>&1; then
    HAVE_TORCH=1
fi
ROWS="$OUT/rows.tsv"
: > "$ROWS"
for b in $SIZES; do
    for loss in $LOSSES; do
        if (( $(left) < 20 )); then
            printf '%s\t%s\tskipped (time)\t-\t-\t-\t-\t-\n' "$loss" "$b" >> "$ROWS"
            continue
        fi
        repeats=5; warmup=2
        if (( b >= 65536 )); then repeats=2; warmup=0; fi
        lossc_ms="-"; lossc_mb="-"; lossc_extra="-"
        if [[ -x "$LOSSC_BIN" ]]; then
            bounded 120 "$LOSSC_BIN" bench --loss "$loss" --params "$(params_of "$loss")" \
                --dims "$(dims_of "$loss" "$b")" --backend "$BACKEND" --dtype f32 \
                --warmup "$warmup" --repeats "$repeats" --format json \
                > "$OUT/lossc-$loss-$b.json" 2> "$OUT/lossc-$loss-$b.err"
            rc=$?
            if (( rc == 0 )); then
                lossc_ms=$(field median_ms < "$OUT/lossc-$loss-$b.json")
                lossc_mb=$(field peak_device_mb < "$OUT/lossc-$loss-$b.json")
                lossc_mb=${lossc_mb:-"-"}
                # Device memory for the loss beyond its inputs and gradients.
                lossc_extra=$(awk -v p="$lossc_mb" -v i="$(field inputs_mb < "$OUT/lossc-$loss-$b.json")" \
                    -v g="$(field gradients_mb < "$OUT/lossc-$loss-$b.json")" \
                    'BEGIN { if (p ~ /^[0-9.e+-]+$/ && p ~ /[0-9]/ && i != "" && g != "") printf "%.0f", p - i - g; else printf "-" }')
            elif (( rc == 124 || rc == 137 )); then
                lossc_ms="timeout"
            else
                lossc_ms="error"
                say "gpu-check: lossc $loss B=$b failed: $(grep -m1 -i 'error' "$OUT/lossc-$loss-$b.err")"
            fi
        fi
        eager_ms="-"; eager_mb="-"; compiled_ms="-"
        if (( HAVE_TORCH )); then
            for mode in eager compile; do
                limit=60; [[ $mode == compile ]] && limit=90
                line=$(bounded "$limit" python3 scripts/gpu_bench_torch.py "$loss" "$b" "$mode" "$repeats" 2>/dev/null | tail -1)
                if [[ "$line" == *median_ms* ]]; then
                    ms=$(echo "$line" | sed -n 's/.*"median_ms": \([-0-9.e+]*\).*/\1/p')
                    mb=$(echo "$line" | sed -n 's/.*"peak_mb": \([-0-9.e+]*\).*/\1/p')
                else
                    ms=$(echo "$line" | sed -n 's/.*"error": "\([^"]*\)".*/\1/p'); ms=${ms:-timeout}; mb="-"
                fi
                if [[ $mode == eager ]]; then eager_ms=$ms; eager_mb=$mb; else compiled_ms=$ms; fi
            done
        fi
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$loss" "$b" "$lossc_ms" "$eager_ms" "$compiled_ms" "$lossc_mb" "$lossc_extra" "$eager_mb" >> "$ROWS"
        say "gpu-check: $loss B=$b: lossc $lossc_ms ms, eager $eager_ms ms, compile $compiled_ms ms"
    done
done

# ---- 3. the table -----------------------------------------------------------------------
ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (a+0 > 0 && b+0 > 0 && a ~ /^[0-9.e+-]+$/ && b ~ /^[0-9.e+-]+$/) printf "%.2f", a / b; else printf "-" }'
}
echo
echo "## lossc CUDA backend vs PyTorch, forward+gradient, float32, D=768"
echo
echo "$(date -u +%Y-%m-%d), $GPU, backend $BACKEND; agreement tests: $AGREEMENT"
echo
echo "| loss | B | lossc ms | eager ms | compile ms | eager / lossc | compile / lossc | lossc peak MiB | lossc beyond inputs+grads MiB | eager peak MiB |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
while IFS=$'\t' read -r loss b l e c lm lx em; do
    echo "| $loss | $b | $l | $e | $c | $(ratio "$e" "$l") | $(ratio "$c" "$l") | $lm | $lx | $em |"
done < "$ROWS"
echo
echo "(ratios above 1: lossc is faster. lossc times include copying inputs to the device and"
echo " gradients back; its peak is the node buffers it holds, inputs included; PyTorch's is"
echo " torch.cuda.max_memory_allocated. Logs: $OUT; $(( $(date +%s) - START )) s in all.)"
