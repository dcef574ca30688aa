#!/bin/sh
# Export with `tierdet build` each model that TIERDET_HOME does not hold yet as
# these weights and the current export format make it. A current build is kept
# (`--keep-current`): re-exporting would change its ONNX file (the build time
# is in its metadata) and so throw away the TensorRT engines cached for it. A
# build recorded under an older export format is exported again, so a fixed
# exporter reaches a volume that holds the old graphs. One process per model.
# usage: tierdet-build-missing WEIGHTS TARGET MODEL[,MODEL...]
set -eu

if [ "$#" -ne 3 ]; then
  echo "usage: tierdet-build-missing WEIGHTS TARGET MODEL[,MODEL...]" >&2
  exit 2
fi
weights=$1
target=$2
models=$3
home=${TIERDET_HOME:?TIERDET_HOME must name the model volume}

for model in $(echo "$models" | tr ',' ' '); do
  tierdet --home "$home" build --weights "$weights" --target "$target" --models "$model" \
    --keep-current
done
