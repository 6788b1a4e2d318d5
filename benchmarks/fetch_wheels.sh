#!/usr/bin/env bash
# Download the wheels a GPU machine without network needs into .whl/ (git-ignored), to be copied there with the tree:
# fla-core (GDN/NSA kernels) and einops, transformers at the version hlsa needs, and pytest for `pytest -m gpu`
# (benchmarks/README.md). Python 3.12 / manylinux x86-64 wheels, dependencies named one by one.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)  # also right in a worktree, where .git is a file
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    fla-core==0.6.0 einops==0.8.2 transformers==5.24.0 pytest==9.0.3 pluggy iniconfig hypothesis sortedcontainers
ls -la .whl
