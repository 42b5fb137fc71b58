#!/usr/bin/env bash
# System packages the test suite needs, from Debian:
#   chromium      headless browser for the web chat page's tests (Playwright drives the Debian package;
#                 `playwright install` is never run)
#   g++           compiles the native decode step (llmos/engine/native_step.cpp) once per machine
#   python3-dev   Python's headers, for the same compilation
# Installs the missing ones with apt-get when run as root; otherwise names them and fails.
# Called by `make test` and by .ci/run. `--check` only reports.
set -euo pipefail
chromium=${LLMOS_CHROMIUM:-/usr/bin/chromium}
python=${PYTHON:-python3}

missing=""
[ -x "$chromium" ] || missing="$missing chromium"
command -v g++ >/dev/null || missing="$missing g++"
include=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
[ -f "$include/Python.h" ] || missing="$missing python3-dev"
missing=${missing# }

if [ -z "$missing" ]; then
    exit 0
fi
if [ "${1:-}" = "--check" ]; then
    echo "system-deps: missing Debian packages: $missing" >&2
    exit 1
fi
if [ "$(id -u)" != 0 ]; then
    echo "system-deps: the tests need these Debian packages, which are missing: $missing" >&2
    echo "system-deps: install them as root: sudo apt-get install -y $missing" >&2
    exit 1
fi
echo "system-deps: installing $missing (apt-get)" >&2
apt-get update -qq
# shellcheck disable=SC2086  # one word per package
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
