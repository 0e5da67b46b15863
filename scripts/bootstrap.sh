#!/usr/bin/env bash
# Sets up everything the project needs on a fresh machine, idempotently:
#   .venv/          a virtual environment with the library and meshctl (editable), the
#                   generated stubs (protos/, editable) and the dev tools, grpcurl among them;
#                   the demo services run from the checkout, never installed
#   .tools/bin/     a Consul binary, unless one is on PATH (scripts/get_consul.py)
#   Debian's redis-server, chromium and postgresql, when missing and apt-get can install
#                   them (root, as on CI)
# Sourced by scripts/dev and scripts/test; safe to run by itself.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "bootstrap: Python 3.11 or newer is needed (found: $("$PYTHON" --version 2>&1))" >&2
    exit 1
fi

if [ ! -x "$ROOT/.venv/bin/python" ]; then
    echo "bootstrap: creating .venv" >&2
    "$PYTHON" -m venv "$ROOT/.venv"
fi

# Reinstall only when the dependencies changed.
STAMP="$ROOT/.venv/.installed-$(cat "$ROOT/pyproject.toml" "$ROOT/protos/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
    echo "bootstrap: installing the project and its dev dependencies into .venv" >&2
    "$ROOT/.venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$ROOT/.venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT/protos" -e "$ROOT[dev]"
    rm -f "$ROOT"/.venv/.installed-*
    touch "$STAMP"
fi

"$ROOT/.venv/bin/python" "$ROOT/scripts/get_consul.py" >/dev/null

# System packages the tests start for real, from Debian, when missing.
need_package() {
    local command="$1" package="$2"
    command -v "$command" >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: installing Debian's $package" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q "$package" >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "$package" >/dev/null; }
    else
        echo "bootstrap: $command not found: install Debian's $package (tests need it)" >&2
    fi
}
need_package redis-server redis-server   # the gateway's shared rate limits
need_package chromium chromium           # the storefront's browser test (Playwright drives it)
need_package docker-compose docker-compose  # checks docker-compose.yml offline (config)
need_package prometheus prometheus         # scrapes every instance (meshctl prometheus-sd feeds it)
# Postgres per service: Debian's postgresql (initdb is not on PATH: look where Debian puts it)
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
    need_package initdb postgresql
fi
