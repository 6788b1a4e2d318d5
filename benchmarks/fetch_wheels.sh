#!/usr/bin/env bash
# Download the wheels the GPU machine lacks into .whl/ (git-ignored), to be carried with each device call:
# fla-core (GDN/NSA kernels), transformers 5.24 (the machine has 5.17, which lacks the `cache` output name), and
# pytest for the `pytest -m gpu` run. Python 3.12 / manylinux x86-64 wheels, dependencies named one by one.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    fla-core==0.6.0 einops==0.8.2 transformers==5.24.0 pytest==9.0.3 pluggy iniconfig hypothesis sortedcontainers
ls -la .whl
