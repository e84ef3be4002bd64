#!/usr/bin/env bash
# Install the server into a virtual environment, NOT editable: the one install recipe that the Dockerfile
# runs and tests/test_container.py runs on the CPU in a fresh venv.
#
#   deploy/install-python.sh VENV SOURCE
#
#   VENV    a virtual environment's directory; created with $PYTHON (default python3) if it has no
#           bin/python yet
#   SOURCE  the project: its source directory (pip builds a wheel from it; setuptools writes build/ and
#           *.egg-info into it, so hand it a copy) or a built .whl
#
# Environment (all optional):
#   TORCH_VERSION     torch release to install first (default 2.13.0)
#   TORCH_INDEX_URL   index to take torch from, e.g. https://download.pytorch.org/whl/cu128 for a CUDA build;
#                     empty (the default): pip's configured registry
#   MOSHI_VERSION     moshi release, installed with --no-deps because it pins torch<2.10 (default 0.2.13)
#   PIP_NO_CACHE_DIR  pip's own variable: set it to 1 in images to keep pip's cache out of the layer
#
# Order matters: torch first (so nothing later resolves another build of it), then moshi without its pins,
# then the project, whose pyproject.toml lists moshi's real runtime needs and accepts any torch>=2.5.
# Every step fails loudly (set -e, and pip's own exit status); the last step imports everything from
# outside the source tree and runs `voice-agent --help`, so a broken install stops here, not at serve time.
set -euo pipefail

usage() { echo "usage: $0 VENV SOURCE   (SOURCE: the project's directory or a .whl)" >&2; exit 2; }
[ "$#" -eq 2 ] || usage
venv="$1"
source="$2"
[ -d "$source" ] || [ -f "$source" ] || { echo "install-python: no such source: $source" >&2; exit 2; }
case "$source" in /*) ;; *) source="$PWD/$source" ;; esac  # the checks below run from another directory

TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"
MOSHI_VERSION="${MOSHI_VERSION:-0.2.13}"

step() { echo "install-python: $*" >&2; }

if [ ! -x "$venv/bin/python" ]; then
    step "creating the virtual environment $venv with ${PYTHON:-python3}"
    "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
pip=("$py" -m pip install --disable-pip-version-check --no-input --progress-bar off)

where="pip's configured registry"
[ -z "$TORCH_INDEX_URL" ] || where="$TORCH_INDEX_URL"
step "torch==$TORCH_VERSION from $where"
if [ -n "$TORCH_INDEX_URL" ]; then
    "${pip[@]}" --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"
else
    "${pip[@]}" "torch==$TORCH_VERSION"
fi

step "moshi==$MOSHI_VERSION without its dependencies (it pins torch<2.10)"
"${pip[@]}" --no-deps "moshi==$MOSHI_VERSION"

step "the project from $source (not editable)"
"${pip[@]}" "$source"

step "checking the installed environment"
# torch must still be the build installed first: a later step must not have swapped it for another.
cd /
"$py" - "$TORCH_VERSION" <<'EOF'
import sys

import moshi
import msgspec
import onnxruntime
import procs
import sentencepiece
import silero_vad
import torch
import uvloop
import websockets

want = sys.argv[1]
have = torch.__version__.split("+")[0]
if have != want:
    sys.exit(f"install-python: torch is {torch.__version__}, expected {want}")
if "site-packages" not in (procs.__file__ or ""):
    sys.exit(f"install-python: procs is imported from {procs.__file__}, not an installed package")
print(f"install-python: torch {torch.__version__} (CUDA {torch.version.cuda}), moshi {moshi.__version__}, "
      f"procs from {procs.__file__}", file=sys.stderr)
EOF
"$venv/bin/voice-agent" --help >/dev/null
"$venv/bin/voice-agent" serve --help >/dev/null
step "done: $venv/bin/voice-agent"
