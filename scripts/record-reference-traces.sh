#!/usr/bin/env bash
# Record the reference traces that `kfacperf validate` and the README's accuracy table use,
# and the cluster model of this machine (commbench), measured in the same quiet session.
#
#   scripts/record-reference-traces.sh [OUT_DIR] [CLUSTER_TOML]
#       OUT_DIR       default traces/reference   (p1/ = 1 process, p2/ = 2 processes)
#       CLUSTER_TOML  default OUT_DIR/local-cpu.toml
#
# Timings are only worth something on a quiet machine.  Each recording is timed against the
# machine's CPU counters (/proc/stat, steal included): the CPU time the machine spent on
# anything but this recording, per second of wall time, is the foreign load.  Before each run
# the script waits until the foreign load over a few seconds is below MAX_FOREIGN (cores);
# a run during which it exceeded MAX_FOREIGN is recorded again (up to TRIES times).  Every
# run's foreign load goes to OUT_DIR/recording.log.
#
# Every profile keeps freed memory in its process (kfacperf.runtime.heap): on this VM the host
# takes freed guest memory back within a minute, and a first touch of such memory runs at
# 0.4 GiB/s, so a run's speed otherwise depended on which of its blocks glibc had given back.
#
# A single recording of a configuration is not enough on a shared VM: the same steps drift by
# 10-20% from one minute to the next.  So every configuration is recorded REPEATS times, as
# <name>-r1, <name>-r2, ..., one whole round of configurations after the other (a drift then
# touches every configuration once instead of one configuration in every repeat);
# `kfacperf validate` pools the recordings of one configuration.
#
# How much two ranks sharing the two cores slow each other is a state of the host too: three
# contention probes in one minute measured 1.02x, 1.12x and 1.41x.  So are the collectives:
# the same small reduce-scatter, timed alone, averaged 1.4 ms in one minute and 3.7 ms in the
# next.  So a probe (the contention probe, which also times collectives right after compute,
# and PROBE_REPS more repetitions of every collective)
# is taken before every PROBE_EVERY configurations (OUT_DIR/probes/), and at the end the
# cluster model is fitted again from commbench and every probe of the session
# (`kfacperf commbench --from-raw`): its contention and its collective times are the
# session's means.
#
# Two processes need about ten SGD steps to settle (the first ones run 1.3-1.5x slower), so
# the SGD and the 10/100-interval runs warm up for ten steps.
#
# Environment: WORKLOAD (resnet20), BATCHES ("16 32"), MAX_FOREIGN (0.15), TRIES (8),
# REPEATS (8: about 55 minutes in all), STEPS_SGD/WARMUP_SGD (30/10),
# STEPS_KFAC/WARMUP_KFAC (12/6: intervals 1/1; two ranks sharing the cores take about six such
# steps to settle), STEPS_STALE/WARMUP_STALE (50/10: intervals 10/100, four factor steps in the
# window), PROBE_EVERY (2), PROBE_REPS (5), COMM_SIZES, NPROCS ("1 2"), SKIP_COMMBENCH (unset), FIRST_ROUND (1; to add
# rounds to a finished set, set it one past its last round, with SKIP_COMMBENCH=1: the probes
# are numbered on).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-traces/reference}
CLUSTER=${2:-$OUT/local-cpu.toml}
KFACPERF=${KFACPERF:-.venv/bin/kfacperf}
WORKLOAD=${WORKLOAD:-resnet20}
BATCHES=${BATCHES:-"16 32"}
NPROCS=${NPROCS:-"1 2"}
MAX_FOREIGN=${MAX_FOREIGN:-0.15}
TRIES=${TRIES:-8}
REPEATS=${REPEATS:-8}
STEPS_SGD=${STEPS_SGD:-30}; WARMUP_SGD=${WARMUP_SGD:-10}
STEPS_KFAC=${STEPS_KFAC:-12}; WARMUP_KFAC=${WARMUP_KFAC:-6}
STEPS_STALE=${STEPS_STALE:-50}; WARMUP_STALE=${WARMUP_STALE:-10}
PROBE_EVERY=${PROBE_EVERY:-2}
PROBE_REPS=${PROBE_REPS:-5}
COMM_SIZES=${COMM_SIZES:-4KiB,64KiB,256KiB,1MiB,4MiB,16MiB}
FIRST_ROUND=${FIRST_ROUND:-1}
HZ=$(getconf CLK_TCK)
LOG="$OUT/recording.log"
mkdir -p "$OUT"

busy_ticks() {  # user nice system irq softirq steal, all CPUs
  awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat
}

foreign_now() {  # foreign load (cores) over 3 s while nothing of ours runs
  local b0 b1
  b0=$(busy_ticks); sleep 3; b1=$(busy_ticks)
  awk -v d=$((b1 - b0)) -v hz="$HZ" 'BEGIN{printf "%.3f", d / hz / 3}'
}

wait_quiet() {
  local f
  while true; do
    f=$(foreign_now)
    if awk -v f="$f" -v m="$MAX_FOREIGN" 'BEGIN{exit !(f < m)}'; then return; fi
    echo "  machine busy (foreign load $f cores); waiting" >&2
    sleep 20
  done
}

# run_quiet NAME CMD...: run CMD until it ran on a quiet machine; log its foreign load
run_quiet() {
  local name=$1; shift
  local try b0 b1 t0 t1 own f
  for try in $(seq 1 "$TRIES"); do
    wait_quiet
    b0=$(busy_ticks); t0=$(date +%s.%N)
    local tf; tf=$(mktemp)
    TIMEFORMAT='%U %S'
    local status=0
    { time "$@" > "$tf.out" 2>&1 ; } 2> "$tf" || status=$?
    b1=$(busy_ticks); t1=$(date +%s.%N)
    if [ "$status" -ne 0 ]; then
      echo "$name try $try: failed (status $status); recording it again" | tee -a "$LOG" >&2
      tail -3 "$tf.out" >&2; rm -f "$tf" "$tf.out"
      continue
    fi
    own=$(awk '{print $1 + $2}' "$tf")
    f=$(awk -v d=$((b1 - b0)) -v hz="$HZ" -v own="$own" -v t0="$t0" -v t1="$t1" \
          'BEGIN{x = (d / hz - own) / (t1 - t0); if (x < 0) x = 0; printf "%.3f", x}')
    rm -f "$tf"
    printf '%s try %d: wall %.1f s, own cpu %.1f s, foreign load %s cores\n' \
      "$name" "$try" "$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b - a}')" "$own" "$f" | tee -a "$LOG"
    if awk -v f="$f" -v m="$MAX_FOREIGN" 'BEGIN{exit !(f < m)}'; then
      rm -f "$tf.out"; return 0
    fi
    tail -3 "$tf.out" >&2; rm -f "$tf.out"
  done
  echo "$name: the machine never stayed quiet; giving up" | tee -a "$LOG" >&2
  return 1
}

echo "# $(date -u +%FT%TZ) $(uname -n) $(nproc) cores; max foreign load $MAX_FOREIGN;" \
  "$REPEATS repeat(s)" >> "$LOG"

if [ -z "${SKIP_COMMBENCH:-}" ]; then
  run_quiet commbench "$KFACPERF" commbench --out "$CLUSTER" --reps 20 \
    --sizes "$COMM_SIZES" --raw "$OUT/commbench.json"
fi

# probe_maybe: a probe (contention and collectives) before every PROBE_EVERY-th configuration
configs=0
probe_maybe() {
  if [ $((configs % PROBE_EVERY)) -eq 0 ]; then
    mkdir -p "$OUT/probes"
    local n; n=$(printf '%02d' $(($(find "$OUT/probes" -name 'probe-*.json' | wc -l) + 1)))
    run_quiet "probe-$n" "$KFACPERF" commbench --reps "$PROBE_REPS" --sizes "$COMM_SIZES" \
      --raw "$OUT/probes/probe-$n.json"
  fi
  configs=$((configs + 1))
}

# profile NAME ARGS...: the same run on every process count, one after the other, so the
# 1-process (calibration) and 2-process (held-out) runs see the same state of the machine
profile() {
  local name=$1; shift
  probe_maybe
  for p in $NPROCS; do
    run_quiet "p$p/$name" "$KFACPERF" profile --workload "$WORKLOAD" --nproc "$p" "$@" \
      --out "$OUT/p$p/$name" --force
  done
}

for r in $(seq "$FIRST_ROUND" $((FIRST_ROUND + REPEATS - 1))); do
  for b in $BATCHES; do
    profile "$WORKLOAD-sgd-b$b-r$r" --optimizer sgd --batch-size "$b" --steps "$STEPS_SGD" \
      --warmup "$WARMUP_SGD"
    for s in spngd kaisa; do
      profile "$WORKLOAD-$s-b$b-i1-r$r" --optimizer kfac --strategy "$s" --batch-size "$b" \
        --factor-interval 1 --inverse-interval 1 --steps "$STEPS_KFAC" --warmup "$WARMUP_KFAC"
      profile "$WORKLOAD-$s-b$b-i10-r$r" --optimizer kfac --strategy "$s" --batch-size "$b" \
        --factor-interval 10 --inverse-interval 100 --steps "$STEPS_STALE" \
        --warmup "$WARMUP_STALE"
    done
  done
done
probe_maybe
if [ -f "$OUT/commbench.json" ]; then
  "$KFACPERF" commbench --from-raw "$OUT/commbench.json" "$OUT"/probes/probe-*.json \
    --out "$CLUSTER" | tee -a "$LOG"
fi
du -sh "$OUT"
