#!/usr/bin/env bash
# Every GPU benchmark of `medfusion bench`, each JSON record written to a file, for a machine with
# an NVIDIA GPU:
#
#   make install                      # then make sure torch sees the GPU (a CUDA build of torch):
#   .venv/bin/python -c 'import torch; assert torch.cuda.is_available()'
#   scripts/gpu_bench.sh [OUT_DIR]    # OUT_DIR defaults to $OUT, else ./bench-results
#   DRY_RUN=1 scripts/gpu_bench.sh    # print the commands, run nothing (tests/bench check them)
#
# Runs train (Ray Train + DeepSpeed ZeRO 0, 1, 2 and 3 vs the plain loop, on cuda), serve (presets
# tiny and small) and ingest. Each bench prints its table and then its JSON record as the last line
# of stdout: that line goes to OUT_DIR/<name>.json, stdout to OUT_DIR/<name>.log, stderr to
# OUT_DIR/<name>.stderr. A bench that fails is reported and the others still run; the exit status
# is the number that failed.
# MEDFUSION names the CLI (default: the repository's .venv/bin/medfusion, else medfusion on PATH).
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-${OUT:-bench-results}}"
if [[ -z "${MEDFUSION:-}" ]]; then
    if [[ -x "$root/.venv/bin/medfusion" ]]; then MEDFUSION="$root/.venv/bin/medfusion"; else MEDFUSION=medfusion; fi
fi
# The Makefile exports DS_ACCELERATOR=cpu for the CPU test suite; DeepSpeed must use the GPU here.
export DS_ACCELERATOR=cuda

# name|arguments of `medfusion`
BENCHES=(
    "train-zero0-3|bench train --device cuda --zero 0,1,2,3"
    "serve-tiny|bench serve preset=tiny"
    "serve-small|bench serve preset=small"
    "ingest|bench ingest"
)

if [[ -n "${DRY_RUN:-}" ]]; then
    for bench in "${BENCHES[@]}"; do echo "${bench%%|*}: $MEDFUSION ${bench#*|}"; done
    exit 0
fi

python="$(dirname "$(command -v "$MEDFUSION")")/python"
[[ -x "$python" ]] || python=python3
if ! "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_bench: $python: torch sees no CUDA GPU; these benches need one" >&2
    exit 1
fi
mkdir -p "$out"
failed=0
for bench in "${BENCHES[@]}"; do
    name="${bench%%|*}"
    read -r -a args <<<"${bench#*|}"
    echo "== $name: $MEDFUSION ${args[*]}" >&2
    start=$SECONDS
    if "$MEDFUSION" "${args[@]}" >"$out/$name.log" 2>"$out/$name.stderr"; then
        tail -n 1 "$out/$name.log" >"$out/$name.json"
        echo "   done in $((SECONDS - start)) s: $out/$name.json" >&2
    else
        failed=$((failed + 1))
        echo "   FAILED after $((SECONDS - start)) s; see $out/$name.stderr" >&2
        tail -n 20 "$out/$name.stderr" >&2
    fi
done
exit "$failed"
