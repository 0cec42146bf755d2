#!/usr/bin/env bash
# Fit the GPU device presets to the published calibration set (published/*.toml with
# role = "calibration"), in dependency order. Each preset's `source` records the command that
# fitted it; held-out cases are never given here. Run from the repository root:
#   bash scripts/calibrate-gpu-presets.sh
set -euo pipefail
cd "$(dirname "$0")/.."
K=${KFACPERF:-.venv/bin/kfacperf}

# V100 (PyTorch): the K-FAC kernels from PipeFisher's per-stage block times, forward and
# backward from DeepLearningExamples' and DLPerf's ResNet-50 throughputs.
$K calibrate --published pipefisher-bert dle-resnet50 dlperf-resnet50 --device v100-sxm2 \
  --fit forward.efficiency,backward.efficiency,forward.mem_efficiency,backward.mem_efficiency,factor_compute.efficiency,precondition.efficiency,inverse_method.cholesky.efficiency,inverse_method.cholesky.row_us \
  --out models/devices/v100-sxm2.toml --force

# A100: V100's terms, its memory terms refitted to DeepLearningExamples' A100 throughputs.
$K calibrate --published dle-resnet50 --device a100-sxm4 --start-from v100-sxm2 \
  --fit forward.mem_efficiency,backward.mem_efficiency --out models/devices/a100-sxm4.toml --force

# V100 as SP-NGD's Chainer stack ran it: the K-FAC kernels as v100-sxm2, forward, backward,
# factor statistics and preconditioning fitted to SP-NGD's Fig. 5 and Table 1.
$K calibrate --published spngd-fig5 spngd-table1 --device v100-spngd --start-from v100-sxm2 \
  --fit forward.efficiency,backward.efficiency,factor_compute.efficiency,precondition.efficiency \
  --out models/devices/v100-spngd.toml --force

# H100 and H200: no published measurement of them is in the calibration set; they keep their
# datasheet peaks and take the A100's terms (assumed). `scripts/gpu-ground-truth.sh` measures
# an H200 for real.
$K calibrate --device h100-sxm5 --start-from a100-sxm4 --out models/devices/h100-sxm5.toml --force
$K calibrate --device h200 --start-from a100-sxm4 --out models/devices/h200.toml --force

# RTX 2080 Ti and SPD-KFAC's cluster: V100's terms carried over; factor statistics, the
# (LU-like) inverse and the network fitted to D-KFAC's breakdown. MPD-KFAC's breakdown
# (published/spdkfac-2080ti.toml) is held out.
$K calibrate --published dkfac-2080ti --device rtx2080ti --start-from v100-sxm2 \
  --cluster rtx2080ti-4x-edr --cluster-out models/clusters/rtx2080ti-4x-edr.toml \
  --fit factor_compute.efficiency,inverse_method.cholesky.efficiency,cluster.inter.bandwidth_GBps \
  --out models/devices/rtx2080ti.toml --force
