#!/usr/bin/env bash
# Set up (or update) the project's virtual environment: `scripts/setup.sh serve|test [VENV]`.
# Called by `make serve` and `make test`; safe to run again.
#
#   serve  what serving needs: the hash-locked requirements/serve.txt, torch, the project itself
#   test   serve + training + the test tools (requirements/test.txt, torchvision), and the Debian packages the
#          tests use: the real Fashion-MNIST and Chromium for the browser tests
#
# torch comes from PyTorch's CPU-only index (about 200 MB) unless an NVIDIA driver answers (nvidia-smi), in which
# case from PyPI's default index (the CUDA build, several GB). TORCH_INDEX_URL overrides the choice; empty means
# PyPI's default. If the chosen index cannot be reached, PyPI's default is used, with a note.
set -euo pipefail
cd "$(dirname "$0")/.."

what=${1:?usage: scripts/setup.sh serve|test [VENV]}
venv=${2:-.venv}
python=${PYTHON:-python3}
cpu_index=https://download.pytorch.org/whl/cpu
say() { echo "setup: $*" >&2; }

# ---- Debian packages, installed only when something is missing ----
missing=()
"$python" -c 'import ensurepip, venv' 2>/dev/null || missing+=("python3-venv")
if [[ $what == test ]]; then
  [[ -n ${FASHION_DATA:-} || -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]] ||
    missing+=(dataset-fashion-mnist)
  command -v chromium >/dev/null || missing+=(chromium chromium-driver)
fi
if ((${#missing[@]})); then
  if ! command -v apt-get >/dev/null; then
    say "missing system packages: ${missing[*]} (this is not a Debian/Ubuntu system: install their equivalents)"
    exit 1
  fi
  sudo=()
  if ((EUID != 0)); then
    command -v sudo >/dev/null || { say "run as root: apt-get update && apt-get install -y ${missing[*]}"; exit 1; }
    sudo=(sudo)  # sudo asks for the password: that is the question before installing
  fi
  say "installing the Debian packages ${missing[*]}"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# ---- the virtual environment ----
[[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip

lock=requirements/serve.txt
torch_packages=(torch)
if [[ $what == test ]]; then
  lock=requirements/test.txt
  torch_packages=(torch torchvision)
fi
# Everything but torch is pinned with hashes: Pillow, for one, decodes untrusted uploads and must not float.
"${pip[@]}" install -q --require-hashes --no-deps -r "$lock"

if [[ -v TORCH_INDEX_URL ]]; then
  index=$TORCH_INDEX_URL
elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  index=  # a GPU answers: PyPI's default Linux wheels are the CUDA build
else
  index=$cpu_index
fi
if [[ -n $index ]]; then
  if ! "${pip[@]}" install -q --retries 1 --timeout 20 -c constraints.txt --index-url "$index" "${torch_packages[@]}"; then
    say "could not install torch from $index; using PyPI's default index instead (the CUDA build, several GB)"
    "${pip[@]}" install -q -c constraints.txt "${torch_packages[@]}"
  fi
else
  "${pip[@]}" install -q -c constraints.txt "${torch_packages[@]}"
fi

# The project itself, editable, so its version (and the console of `pip list`) is the checkout's.
"${pip[@]}" install -q --no-deps -e .
"${pip[@]}" check >/dev/null || { "${pip[@]}" check; exit 1; }
say "$venv is ready for '$what'"
