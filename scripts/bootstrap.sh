#!/usr/bin/env bash
# Installs what rockstate needs to build and test on a fresh Debian machine.
# Idempotent: every step checks first and does nothing when already satisfied.
# Runs as root (apt-get, pip); prints what it installs.
set -euo pipefail

need_apt=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# libclang for the RocksDB bindings (bindgen), a C and C++ toolchain and make for RocksDB and jemalloc,
# cmake and perl for the TLS crate used by the S3/GCS/Azure clients.
for pkg in libclang-dev clang g++ make cmake perl pkg-config; do
  have_pkg "$pkg" || need_apt+=("$pkg")
done

if [ ${#need_apt[@]} -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

# The S3-protocol test server (moto_server), used by the S3 tests on 127.0.0.1.
if ! command -v moto_server >/dev/null 2>&1 || ! python3 -c 'import moto' >/dev/null 2>&1; then
  echo "bootstrap: installing moto[server] with pip"
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore 'moto[server]==5.2.5'
  # pyenv installs console scripts behind shims that must be regenerated.
  if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "bootstrap: cargo not found; install a Rust toolchain (1.91 or newer)" >&2
  exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "bootstrap: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
