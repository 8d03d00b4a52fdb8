#!/usr/bin/env bash
# Sets up one TPU VM worker and runs self-distillation on it; launch/tpu_vm.py runs it on every
# worker of the slice at once, from the repository root:
#   bash launch/run_on_tpu.sh PRESET WORKDIR [--config.FIELD=VALUE ...]   set up, then train
#   bash launch/run_on_tpu.sh --setup                                   set up only
# Setup makes .venv (Python >= 3.11) and installs requirements.txt, this package, jax[tpu] at
# the jax version requirements.txt pins and gcsfs for gs:// workdirs; it is skipped while those
# two files are unchanged.
# All output is appended to LOG_FILE.
set -euo pipefail

LOG_FILE="$HOME/spellm_train.log"  # launch/tpu_vm.py's LOG_FILE: its `logs` command tails this
LIBTPU_RELEASES="https://storage.googleapis.com/jax-releases/libtpu_releases.html"
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"  # PyPI's Linux torch pulls in CUDA
SETUP_STAMP=".venv/.spellm_setup"

usage() {
  echo "usage: bash launch/run_on_tpu.sh PRESET WORKDIR [--config.FIELD=VALUE ...]" >&2
  echo "       bash launch/run_on_tpu.sh --setup" >&2
  exit 2
}

pin() {  # The version requirements.txt pins for package $1 (empty if none).
  sed -n "s/^$1==\([^[:space:]#]*\).*/\1/p" requirements.txt
}

find_python() {  # The first Python >= 3.11 on PATH (pyproject.toml requires it).
  local candidate
  for candidate in python3 python3.13 python3.12 python3.11; do
    if command -v "$candidate" > /dev/null \
        && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

setup() {
  if [[ ! -x .venv/bin/python ]]; then
    local python
    if ! python="$(find_python)"; then  # Ubuntu 22.04 images ship Python 3.10.
      sudo apt-get update -q
      sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3.11 python3.11-venv
      python="python3.11"
    fi
    "$python" -m venv .venv
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
  local wanted
  wanted="$(cat requirements.txt pyproject.toml | sha256sum)"
  if [[ -f "$SETUP_STAMP" && "$(cat "$SETUP_STAMP")" == "$wanted" ]]; then
    echo "setup: .venv is up to date"
    return 0
  fi
  local jax_version torch_version
  jax_version="$(pin jax)"
  torch_version="$(pin torch)"
  if [[ -z "$jax_version" ]]; then
    echo "setup: requirements.txt pins no jax version (expected a line jax==X.Y.Z)" >&2
    return 1
  fi
  python -m pip install -q --upgrade pip
  if [[ -n "$torch_version" ]]; then
    python -m pip install "torch==$torch_version" --index-url "$TORCH_CPU_INDEX"
  fi
  python -m pip install -r requirements.txt -e .
  python -m pip install "jax[tpu]==$jax_version" -f "$LIBTPU_RELEASES"
  python -m pip install gcsfs google-cloud-storage  # gs:// workdirs (epath, TensorBoard events)
  echo "$wanted" > "$SETUP_STAMP"
}

train() {
  local preset="$1" workdir="$2"
  shift 2
  python -m spellm_jax.train --config="configs/llama.py:$preset" --workdir="$workdir" \
    --config.distributed=True "$@"
}

log() {  # Copies stdin to stdout and LOG_FILE; outlives SIGTERM/SIGHUP and a closed stdout, so
  # a preempted or disconnected trainer can still write its final checkpoint message.
  trap '' HUP TERM
  exec tee -p -a "$LOG_FILE"
}

[[ $# -ge 1 ]] || usage
if [[ "$1" == "--setup" ]]; then
  [[ $# -eq 1 ]] || usage
  { echo "=== $(date -u '+%F %T') UTC $(hostname): setup"; setup; } 2>&1 | log
else
  [[ $# -ge 2 ]] || usage
  { echo "=== $(date -u '+%F %T') UTC $(hostname): train $*"; setup; train "$@"; } 2>&1 | log
fi
