#!/usr/bin/env bash
# Here, before a device run: download wheels.txt for the GPU machine's Python (3.12, x86-64) into
# .whl/ at the repository root, ignored by git, carried by the run (`carry: [".whl"]`).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
grep -v '^#' bench/device/wheels.txt | grep . | while read -r pin; do
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl "$pin"
done
du -sh .whl
