#!/usr/bin/env bash
# Ground truth on a real GPU, in one run of about 8 minutes on one NVIDIA H200:
#   * kfacperf profile of ResNet-50 on one GPU, SGD and K-FAC (spngd, eigen), bf16 and tf32,
#     batch 32, 64, 128 and 256 per GPU, intervals 10/100 and 1/1 (CUDA-event stage timings,
#     NVTX ranges, NVML telemetry), the most valuable runs first;
#   * the stage timer's overhead on the GPU (timer on vs off, interleaved pairs of steps);
#   * kernel timings: eigh and Cholesky against matrix size, K-FAC factor computation of
#     ResNet-50 layers, GEMM rates (kfacperf/bench/kernels/);
# with a time guard that skips (and names) what would not fit.  Everything lands, small, in
# one folder.  docs/gpu-ground-truth.md says how to run it and what to do with the outputs.
#
#   scripts/gpu-ground-truth.sh [--out DIR] [--return DIR] [--dry-run] [--budget-s SECONDS]
#                               [--precisions bf16,tf32] [--no-nsys] [--force] [--wheels DIR]
#
# --out: the output folder (default gpu-ground-truth/, or /tmp/gpu-ground-truth where $OUT
# is set); an existing one that is not empty is refused without --force.  --return: a folder
# that gets, after every task, ground-truth.tar.gz (the whole output folder) and copies of
# summary.txt and ground-truth.log: the three files a device machine hands back (default
# $OUT; none if unset).  --budget-s: the whole script's time budget (default 480).
# --dry-run: the same steps tiny on the CPU (CIFAR ResNet-20, batch 2 and 4, matrix sizes
# up to 128), no wheel install, no time guard; the test suite runs it.
#
# Python: $PYTHON; else .venv/bin/python for a dry run if this checkout has one; else python3.
# It must import torch.  Without --dry-run, the wheels that scripts/fetch-gpu-wheels.sh put in
# .whl/ (--wheels; nvtx, plotly, simpy, ...) are installed into /tmp/site
# ($GPU_GROUND_TRUTH_SITE; no registry needed) and kfacperf runs from this source tree; a
# wheel that does not install is named and left out, never the end of the run.  torch,
# numpy, pandas, pyarrow and nvidia-ml-py must already be there.
set -euo pipefail
cd "$(dirname "$0")/.."

ARGS=("$@")
OUT_DIR=
RETURN_DIR=${OUT:-}
FORCE=0
DRY_RUN=0
BUDGET_S=480
WHEELS_DIR=.whl
SITE=${GPU_GROUND_TRUTH_SITE:-/tmp/site}
PASS=()
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --out) OUT_DIR=$2; shift 2 ;;
    --out=*) OUT_DIR=${1#*=}; shift ;;
    --return) RETURN_DIR=$2; shift 2 ;;
    --return=*) RETURN_DIR=${1#*=}; shift ;;
    --force) FORCE=1; shift ;;
    --wheels) WHEELS_DIR=$2; shift 2 ;;
    --wheels=*) WHEELS_DIR=${1#*=}; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --budget-s) BUDGET_S=$2; shift 2 ;;
    --budget-s=*) BUDGET_S=${1#*=}; shift ;;
    --precisions) PASS+=(--precisions "$2"); shift 2 ;;
    --precisions=*) PASS+=("$1"); shift ;;
    --no-nsys) PASS+=(--no-nsys); shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu-ground-truth: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

# Whole seconds (bash's arithmetic): anything else would stop the script half way, after
# its set-up, instead of here.
if ! [[ $BUDGET_S =~ ^[0-9]+$ ]]; then
  echo "gpu-ground-truth: --budget-s wants whole seconds, got '$BUDGET_S'" >&2
  exit 2
fi

# The interpreter: $PYTHON if set; else, for a dry run, this checkout's .venv (make venv) if
# there is one; else python3 (on the GPU machine its own, with CUDA torch: never a CPU venv).
if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON
elif [[ $DRY_RUN == 1 && -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi
if ! "$PY" -c 'import torch' >/dev/null 2>&1; then
  echo "gpu-ground-truth: $PY cannot import torch; run 'make venv' here, or set PYTHON to an" \
    "interpreter that has torch (on the GPU machine, its own python3)" >&2
  exit 2
fi
if [[ -z $OUT_DIR ]]; then
  if [[ -n $RETURN_DIR ]]; then OUT_DIR=${TMPDIR:-/tmp}/gpu-ground-truth; else OUT_DIR=gpu-ground-truth; fi
fi
if [[ -d $OUT_DIR && -n $(ls -A "$OUT_DIR" 2>/dev/null) && $FORCE == 0 ]]; then
  echo "gpu-ground-truth: $OUT_DIR is not empty; give another --out, or --force to write" \
    "into it" >&2
  exit 2
fi
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
if [[ -n $RETURN_DIR ]]; then
  mkdir -p "$RETURN_DIR"
  RETURN_DIR=$(cd "$RETURN_DIR" && pwd)
  if [[ $RETURN_DIR == "$OUT_DIR" ]]; then
    echo "gpu-ground-truth: --return $RETURN_DIR is the output folder; give --out a folder" \
      "of its own" >&2
    exit 2
  fi
fi
LOG="$OUT_DIR/ground-truth.log"
: > "$LOG"
say() { echo "gpu-ground-truth: $*" | tee -a "$LOG"; }

# However the script ends (an error in the set-up too), the return folder gets the archive of
# everything written so far; the driver refreshes it after every task as well.
return_outputs() {
  local status=$?
  [[ -z $RETURN_DIR ]] && return
  if ! PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m kfacperf.pipeline.ground_truth.hand_back \
      "$OUT_DIR" "$RETURN_DIR" >/dev/null; then
    echo "gpu-ground-truth: packing with python failed; using tar" >&2
    tar -czf "$RETURN_DIR/ground-truth.tar.gz" -C "$OUT_DIR" . || true
    cp "$LOG" "$RETURN_DIR/" 2>/dev/null || true
  fi
  return "$status"
}
trap return_outputs EXIT
export PYTHONUNBUFFERED=1

{
  printf 'command: scripts/gpu-ground-truth.sh'
  for a in "${ARGS[@]+"${ARGS[@]}"}"; do printf ' %q' "$a"; done
  printf '\n'
  echo "OUT=${OUT:-}"
  echo "output folder: $OUT_DIR"
  echo "return folder: ${RETURN_DIR:-none}"
  if [[ $DRY_RUN == 1 ]]; then echo "dry run (no time guard)"; else echo "budget: ${BUDGET_S} s"; fi
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname)"
  echo "kernel: $(uname -srm)"
  echo "cpus: $(nproc 2>/dev/null || echo '?')"
} > "$OUT_DIR/command.txt"

if command -v nvidia-smi >/dev/null 2>&1; then
  {
    nvidia-smi || true
    echo
    nvidia-smi --query-gpu=name,uuid,driver_version,pstate,clocks.max.sm,clocks.max.mem,power.limit,memory.total,temperature.gpu --format=csv || true
    echo
    nvidia-smi -q -d CLOCK,POWER,PERFORMANCE || true
  } > "$OUT_DIR/nvidia-smi.txt" 2>&1
else
  echo "nvidia-smi: not found on this machine" > "$OUT_DIR/nvidia-smi.txt"
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# One wheel into $SITE with pip (no registry), or unpacked where there is no pip (a wheel is
# a zip archive laid out for site-packages).
install_wheel() {
  if [[ $HAVE_PIP == 1 ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --disable-pip-version-check --target "$SITE" "$@" 2>&1 | tee -a "$LOG"
  else
    local w
    for w in "$@"; do "$PY" -m zipfile -e "$w" "$SITE" 2>&1 | tee -a "$LOG" || return 1; done
  fi
}

# The wheels of .whl/ (--wheels), all at once; where that fails, one at a time.  A wheel that
# does not install is named (log, wheels.txt) and the run goes on without it: the driver
# needs none of them (without nvtx, NVTX ranges go through torch's bindings, and run.json
# says so), and the measurements are the only chance.
if [[ $DRY_RUN == 0 ]]; then
  shopt -s nullglob
  wheels=()
  for w in "$WHEELS_DIR"/*.whl; do
    case $(basename "$w") in
      torch-*|numpy-*|pandas-*|pyarrow-*|nvidia_ml_py-*)
        say "not installing $w: the machine's own build is used" ;;
      *) wheels+=("$w") ;;
    esac
  done
  shopt -u nullglob
  if [[ ${#wheels[@]} -gt 0 ]]; then
    mkdir -p "$SITE"
    HAVE_PIP=1
    "$PY" -m pip --version >/dev/null 2>&1 || HAVE_PIP=0
    say "installing ${#wheels[@]} wheel(s) from $WHEELS_DIR into $SITE" \
      "$([[ $HAVE_PIP == 1 ]] && echo "with pip" || echo "(no pip for $PY: unpacking them)")"
    installed=() failed=()
    if install_wheel "${wheels[@]}"; then
      installed=("${wheels[@]}")
    else
      say "installing the wheels together failed (see above); trying them one at a time"
      for w in "${wheels[@]}"; do
        if install_wheel "$w"; then installed+=("$w"); else failed+=("$w"); fi
      done
    fi
    export PYTHONPATH="$SITE:$PYTHONPATH"
    {
      printf '%s\n' "${installed[@]+"${installed[@]}"}"
      for w in "${failed[@]+"${failed[@]}"}"; do printf 'not installed: %s\n' "$w"; done
    } > "$OUT_DIR/wheels.txt"
    if [[ ${#failed[@]} -gt 0 ]]; then
      say "WARNING: ${#failed[@]} wheel(s) did not install, going on without them:" \
        "${failed[*]} (versions.txt says what is missing)"
    fi
  else
    say "no wheels in $WHEELS_DIR (scripts/fetch-gpu-wheels.sh fetches them); using what is" \
      "installed"
  fi
fi

"$PY" - > "$OUT_DIR/versions.txt" 2>&1 <<'PYEOF' || true
import platform, sys
print("python", platform.python_version(), sys.executable)
try:
    import torch
    print("torch", torch.__version__)
    print("cuda", torch.version.cuda, "available", torch.cuda.is_available())
    print("cudnn", torch.backends.cudnn.version())
    if torch.cuda.is_available():
        v = torch.cuda.nccl.version()
        print("nccl", ".".join(map(str, v)) if isinstance(v, tuple) else v)
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"gpu {i}", p.name, f"{p.total_memory / 2**30:.1f} GiB",
                  "capability", torch.cuda.get_device_capability(i))
except Exception as exc:
    print("torch: unusable:", exc)
from importlib import metadata
for module, dist in (("numpy", "numpy"), ("pandas", "pandas"), ("pyarrow", "pyarrow"),
                     ("pynvml", "nvidia-ml-py"), ("nvtx", "nvtx"), ("simpy", "simpy"),
                     ("plotly", "plotly"), ("narwhals", "narwhals")):
    try:
        __import__(module)
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            version = "?"
        print(dist, version)
    except Exception as exc:
        print(dist, "missing:", exc)
PYEOF
cat "$OUT_DIR/versions.txt" | tee -a "$LOG"

DRIVER=("$PY" -m kfacperf.pipeline.ground_truth --out "$OUT_DIR" "${PASS[@]+"${PASS[@]}"}")
[[ -n $RETURN_DIR ]] && DRIVER+=(--return "$RETURN_DIR")
if [[ $DRY_RUN == 1 ]]; then
  DRIVER+=(--dry-run)
  HARD_STOP=600
else
  LEFT=$((BUDGET_S - SECONDS))
  DRIVER+=(--budget-s "$LEFT")
  HARD_STOP=$((LEFT + 90))  # the driver's time guard should stop it long before this
fi
say "running: ${DRIVER[*]}"
set +e
timeout -k 10 "$HARD_STOP" "${DRIVER[@]}" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
set -e
if [[ $rc == 124 || $rc == 137 ]]; then
  say "the driver ran past its hard stop (${HARD_STOP} s) and was stopped; see logs/"
fi

(cd "$OUT_DIR" && find . -type f ! -name files.txt -printf '%10s  %P\n' | sort -k2) \
  > "$OUT_DIR/files.txt"
say "finished in ${SECONDS} s with status $rc; $(wc -l < "$OUT_DIR/files.txt") file(s), $(du -sh "$OUT_DIR" | cut -f1) in $OUT_DIR"
exit "$rc"
