#!/usr/bin/env bash
# Download exactly the wheels bench/gpu_wheels.txt lists (hash-checked, no dependency resolution) into
# .whl/ (git-ignored), for python 3.12 on x86_64 Linux: what bench/gpu_check.py needs on the GPU machine
# beyond what that machine has. Then check every file and the total size against the list.
#
#   bash bench/fetch_gpu_wheels.sh            # into .whl/ of the repository root
#   bash bench/fetch_gpu_wheels.sh DIR        # elsewhere
#   PIP="uv pip" bash bench/fetch_gpu_wheels.sh   # another pip front end (default: python3 -m pip)
#
# rouge-score publishes only an sdist: it is downloaded hash-checked and built into its pure-Python wheel
# here (pip wheel, setuptools from the package index). Needs a package index; never runs on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.whl}"
list=bench/gpu_wheels.txt
pip=${PIP:-python3 -m pip}
tags=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
grep -E '^[A-Za-z0-9]' "$list" | grep -v 'built here from the sdist' > "$work/binary.txt"
grep -E '^[A-Za-z0-9]' "$list" | grep 'built here from the sdist' > "$work/sdist.txt" || true
mkdir -p "$dest"
rm -f "$dest"/*.whl
$pip download --quiet --no-deps --require-hashes --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    "${tags[@]}" --dest "$dest" -r "$work/binary.txt"
if [ -s "$work/sdist.txt" ]; then
    $pip download --quiet --no-deps --require-hashes --no-binary=:all: --dest "$work/sdist" -r "$work/sdist.txt"
    $pip wheel --quiet --no-deps --wheel-dir "$dest" "$work"/sdist/*
fi
python3 - "$list" "$dest" <<'EOF'
import re, sys
from pathlib import Path

listed, dest = Path(sys.argv[1]), Path(sys.argv[2])
expected = {}
for line in listed.read_text().splitlines():
    m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+) .*#\s*(\d+) bytes, (\S+)", line)
    if m:
        expected[m.group(4).rstrip(";")] = (int(m.group(3)), "from the sdist" in line)
present = {p.name: p.stat().st_size for p in dest.glob("*.whl")}
problems = [f"missing: {name}" for name in expected if name not in present]
problems += [f"not in {listed}: {name}" for name in present if name not in expected]
for name, (size, built) in expected.items():
    if name in present and present[name] != size and not built:  # a wheel built here may differ by its metadata
        problems.append(f"{name}: {present[name]} bytes, the list says {size}")
total = sum(present.values())
for name in sorted(present):
    print(f"{present[name] / 2**20:8.2f} MiB  {name}")
print(f"{total / 2**20:8.2f} MiB  total in {dest}/ ({len(present)} wheels)")
if total > 60 * 2**20:
    problems.append(f"{total / 2**20:.1f} MiB: with the working tree over the 64 MiB that may travel")
if problems:
    sys.exit("fetch_gpu_wheels.sh: " + "; ".join(problems))
EOF
