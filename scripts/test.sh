#!/usr/bin/env bash
# The README's test command: install midiva with its test tools, then lint, type-check and test.
# torch==2.13.0 first: the CPU build kept on these machines (a bare `torch` pulls CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[dev]"
# The HTML report test renders the page in headless Chromium (Debian's package). Only CI installs
# it (CI=true, as CI services set); on a workstation the test is skipped and says how to enable it.
if [ "${CI:-}" = "true" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the report screenshot test will fail under CI=true" >&2
fi
# tests/slurm (marker slurm) installs Debian's slurmctld slurmd slurm-client munge itself when absent
# (root and apt-get), runs a private Slurm, and fails loudly where it cannot.
midiva --help >/dev/null
python3 -m ruff check src tests benchmarks scripts
python3 -m ruff format --check src tests benchmarks scripts
python3 -m mypy src
python3 -m pytest -q -m "not gpu" --durations=20 "$@"  # gpu tests run on the lent device: pytest -m gpu
