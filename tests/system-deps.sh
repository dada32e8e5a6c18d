#!/usr/bin/env bash
# Installs the system packages the test suite starts for real (Debian), when they are missing.
# One line per dependency: "binary:debian-package".
set -euo pipefail
deps=(
  "redis-server:redis-server"
  "prometheus:prometheus"
  "promtool:prometheus"
)
need=()
for item in "${deps[@]}"; do
  command -v "${item%%:*}" >/dev/null 2>&1 || need+=("${item##*:}")
done
[ ${#need[@]} -eq 0 ] && exit 0
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
