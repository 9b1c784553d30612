#!/bin/sh
# Install NTONIX from the wheels in $1 and nothing else. The Dockerfile's
# runtime stage runs this; so does a test, outside Docker.
set -eu
wheels="$1"
python -m pip install --no-cache-dir --no-index --find-links "$wheels" ntonix
# twistd finds plugins through a cache (dropin.cache) written beside them; the
# non-root runtime user cannot write site-packages, so write it now.
python -c "import twisted.plugins; from twisted.plugin import IPlugin, getPlugins; \
names = [p.tapname for p in getPlugins(IPlugin, twisted.plugins) if hasattr(p, 'tapname')]; \
assert 'ntonix' in names, names"
