#!/usr/bin/env bash
# Write constraints/image.txt: the exact version of every Python package docker/Dockerfile
# installs besides torch (constraints/torch.txt) and gptrain, so that an image built later
# gets the same ones. Run it, with the image's Python version (3.11) and on Linux x86_64, after
# changing pyproject.toml's dependencies or the image's extras:
#
#   docker/lock.sh [EXTRAS]          (default: wandb, the Dockerfile's GPTRAIN_EXTRAS)
#
# It asks pip to resolve the project without installing anything (pip's --dry-run --report).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-wandb}
python=${PYTHON:-python3}
report=$(mktemp)
trap 'rm -f "$report"' EXIT
"$python" -m pip install --dry-run --ignore-installed --quiet --report "$report" \
  -c constraints/torch.txt ".${extras:+[$extras]}"
{
  echo "# The image's Python packages besides torch and gptrain, for Linux x86_64 and Python 3.11:"
  echo "# written by docker/lock.sh (extras: ${extras:-none}); docker/Dockerfile installs with it."
  "$python" - "$report" <<'PY'
import json
import sys

installed = json.load(open(sys.argv[1]))["install"]
pins = sorted((p["metadata"]["name"].lower().replace("_", "-"), p["metadata"]["version"]) for p in installed)
print("\n".join(f"{name}=={version}" for name, version in pins if name not in ("gptrain", "torch")))
PY
} >constraints/image.txt
echo "wrote constraints/image.txt"
