#!/usr/bin/env sh
# Ahead-of-time warm-up, as a container build step runs it (see examples/Dockerfile):
#   sh examples/aot_warmup.sh MODELS_DIR CACHE_DIR
# Compiles every model into the cache, checks the cache, and prints what it holds.
# A second run finds every model in the cache.
set -eu
models=${1:?models directory}
cache=${2:?cache directory}
aioov warmup "$models" --cache-dir "$cache" --device CPU
aioov cache verify --cache-dir "$cache"
aioov cache stats --cache-dir "$cache"
