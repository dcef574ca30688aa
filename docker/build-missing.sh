#!/bin/sh
# Export with `tierdet build` each model that TIERDET_HOME does not hold yet.
# A model already built is kept: re-exporting would change its ONNX file (the
# build time is in its metadata) and so throw away the TensorRT engines cached
# for it.
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
  if [ -f "$home/onnx/$model.json" ] && [ -f "$home/onnx/$model.onnx" ] \
     && [ -f "$home/repository/$target/$model/config.pbtxt" ]; then
    echo "$model: already built, kept"
  else
    tierdet --home "$home" build --weights "$weights" --target "$target" --models "$model"
  fi
done
