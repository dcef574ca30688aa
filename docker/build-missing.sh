#!/bin/sh
# Export with `tierdet build` each model that TIERDET_HOME does not hold yet as
# these weights and the current export format make it. A current build is kept
# (`--keep-current`): re-exporting would change its ONNX file (the build time
# is in its metadata) and so throw away the TensorRT engines cached for it. A
# build recorded under an older export format is exported again, so a fixed
# exporter reaches a volume that holds the old graphs. One process per model.
# Then the model cards, if any (paths relative to the working folder), the same
# way: a card whose file and graph are unchanged keeps its build.
# usage: tierdet-build-missing WEIGHTS TARGET MODEL[,MODEL...] [CARD[,CARD...]]
set -eu

if [ "$#" -lt 3 ] || [ "$#" -gt 4 ]; then
  echo "usage: tierdet-build-missing WEIGHTS TARGET MODEL[,MODEL...] [CARD[,CARD...]]" >&2
  exit 2
fi
weights=$1
target=$2
models=$3
cards=${4:-}
home=${TIERDET_HOME:?TIERDET_HOME must name the model volume}

for model in $(echo "$models" | tr ',' ' '); do
  tierdet --home "$home" build --weights "$weights" --target "$target" --models "$model" \
    --keep-current
done
for card in $(echo "$cards" | tr ',' ' '); do
  tierdet --home "$home" build --card "$card" --target "$target" --keep-current
done
