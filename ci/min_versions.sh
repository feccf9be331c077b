#!/usr/bin/env bash
# Build a fresh venv with the declared minimum versions (ci/constraints-min.txt) and run the
# Gymnasium env tests on it. Usage: ci/min_versions.sh [venv-dir]   (default /tmp/diffusiongym-min)
# The optional clients (stable-baselines3, torchrl, moviepy) are not installed there, so the interop tests
# that need them skip in this run (they run in `make test`, whose dev extra installs them).
# gymnasium 1.0.0 is below the floor: `import diffusiongym` fails there (gymnasium.vector.AutoresetMode
# arrived in 1.1.0).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${1:-/tmp/diffusiongym-min}
python3 -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install "${TORCH_SPEC:-torch==2.13.0}"  # set TORCH_SPEC / PIP_EXTRA_INDEX_URL for a CPU wheel index in CI
"$PIP" install -c "$ROOT/ci/constraints-min.txt" gymnasium numpy safetensors tqdm diffusers pytest
"$PIP" install --no-deps -e "$ROOT"
"$VENV/bin/python" - <<'PY'
import gymnasium, numpy
import diffusers
assert (gymnasium.__version__, numpy.__version__, diffusers.__version__) == ("1.1.0", "1.24.4", "0.30.0"), (gymnasium.__version__, numpy.__version__, diffusers.__version__)
PY
cd "$ROOT"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$VENV/bin/python" -m pytest -q -p no:cacheprovider -m "not slow" \
    tests/test_gym_env.py tests/test_vector_env.py tests/test_discrete.py tests/test_env_bad_inputs.py tests/test_gym_interop.py \
    tests/test_diffusers_bridge.py tests/test_no_network.py
