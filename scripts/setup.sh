#!/usr/bin/env bash
# Sets up a fresh machine: Debian's Fashion-MNIST (the default run's data) and python3-venv where
# missing, a virtual environment in .venv with hydra_jax and its dependencies (add "test" for the
# test-only ones).
set -euo pipefail
cd "$(dirname "$0")/.."
debs=()
[ -d /usr/share/datasets/fashion-mnist ] || debs+=(dataset-fashion-mnist)
python3 -c "import ensurepip" 2>/dev/null || debs+=(python3-venv)  # Debian splits venv out
if [ ${#debs[@]} -gt 0 ]; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${debs[@]}"
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
req=requirements.txt
[ "${1:-}" = test ] && req=requirements-test.txt
.venv/bin/pip install -q -r "$req"
[ "${1:-}" = test ] && .venv/bin/pip install -q --no-deps -r requirements-test-nodeps.txt
.venv/bin/pip install -q --no-deps -e .
