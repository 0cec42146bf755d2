#!/usr/bin/env bash
# Download the wheels that kfacperf needs on a GPU machine without a package registry.
#
# The device machine has python 3.12 (x86_64) with torch (CUDA), numpy, pandas, pyarrow and
# nvidia-ml-py, and nothing else of pyproject.toml's dependencies: nvtx, plotly (with its own
# narwhals and packaging) and simpy travel as wheels in .whl/ (git-ignored), which
# scripts/gpu-ground-truth.sh installs there with --no-index.  Run this where PyPI is
# reachable, then ship .whl/ with the working tree (docs/gpu-ground-truth.md).
#
# The versions are those the test suite runs with (make venv); torch, numpy, pandas, pyarrow
# and nvidia-ml-py are never fetched: the device's own builds must stay in charge.
set -euo pipefail
cd "$(dirname "$0")/.."

PY_VERSION=${PY_VERSION:-3.12}
DEST=.whl
# NAME==VERSION of every package the device lacks, the dependencies of those included
PACKAGES=(
  nvtx==0.2.17        # NVTX ranges (C extension: a manylinux wheel)
  simpy==4.1.2        # the simulator's event engine (pure Python)
  plotly==7.1.0       # report figures (pure Python); needs narwhals and packaging
  narwhals==2.29.0
  packaging==26.4
)

mkdir -p "$DEST"
# Wheels of these packages fetched earlier (another version, or for another python) would
# travel too and break the install there: only this run's are kept.
for spec in "${PACKAGES[@]}"; do
  name=${spec%%==*}
  rm -f "$DEST"/"${name//-/_}"-*.whl
done
for spec in "${PACKAGES[@]}"; do
  python3 -m pip download --no-deps --only-binary=:all: \
    --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 \
    -d "$DEST" "$spec"
done

# Every wheel's own requirements must be in the list above or on the device already.
status=0
on_device="torch numpy pandas pyarrow nvidia-ml-py"
for spec in "${PACKAGES[@]}"; do
  name=${spec%%==*}
  version=${spec##*==}
  wheel=$(ls "$DEST"/"${name//-/_}"-"$version"-*.whl 2>/dev/null | head -n 1 || true)
  if [[ -z $wheel ]]; then
    echo "fetch-gpu-wheels: no wheel for $spec in $DEST" >&2
    status=1
    continue
  fi
  while read -r req; do
    [[ -z $req ]] && continue
    dep=$(sed -E 's/^([A-Za-z0-9_.-]+).*/\1/' <<<"$req" | tr 'A-Z_' 'a-z-')
    if [[ " ${PACKAGES[*]%%==*} " != *" $dep "* && " $on_device " != *" $dep "* ]]; then
      echo "fetch-gpu-wheels: $name requires $req, which is neither fetched nor on the device" >&2
      status=1
    fi
  done < <(unzip -p "$wheel" '*/METADATA' | sed -n 's/^Requires-Dist: //p' | grep -v 'extra ==' || true)
done
ls -l "$DEST"
exit "$status"
