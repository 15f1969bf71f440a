#!/usr/bin/env bash
# Every GPU check in one device run (the device tool runs this from the repository root):
#   bash tests/gpu/run_all.sh [--full]
# kernels at the FLUX shapes (--quick unless --full), the main job end to end on the GPU, and, when
# .fmtcheck/ref.npz is carried (tests/gpu/make_formats_ref.py writes it), the formats under jit on the GPU against torchao's bytes.
set -uo pipefail
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
quick=--quick; [ "${1:-}" = "--full" ] && quick=
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
rc=0
python3 tests/gpu/check_kernels.py $quick > "$OUT/check_kernels.log" 2>&1 || rc=1
python3 tests/gpu/check_backends.py > "$OUT/check_backends.log" 2>&1 || rc=1
python3 tests/gpu/check_convert.py > "$OUT/check_convert.log" 2>&1 || rc=1
if [ -f .fmtcheck/ref.npz ]; then python3 tests/gpu/check_formats.py > "$OUT/check_formats.log" 2>&1 || rc=1; fi
for f in "$OUT"/check_*.log; do echo "== $f"; grep -v "^PASS" "$f" | tail -12; grep -c "^PASS" "$f"; done
exit $rc
