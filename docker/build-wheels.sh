#!/bin/sh
# Wheels for NTONIX and everything it depends on, from the source tree $1
# into $2. The Dockerfile's build stage runs this; so does a test, outside Docker.
set -eu
src="$1"
out="$2"
python -m pip wheel --no-cache-dir --wheel-dir "$out" "$src"
