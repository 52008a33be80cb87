#!/usr/bin/env bash
# The whole test suite, from a fresh machine: start the brokers (idempotent, fails loudly if one
# does not come up), install tox, run lint and every test (unit, functional, conformance).
# Extra arguments go to pytest, e.g. bash tools/test.sh tests/unit -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/services.sh
python3 -m pip install --quiet --disable-pip-version-check "tox>=4"
exec timeout --kill-after=30s 80m python3 -m tox -e lint,py3 -- "$@"
