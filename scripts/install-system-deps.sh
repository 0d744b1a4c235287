#!/usr/bin/env bash
# Installs the Debian packages that the tests need, if they are missing:
# PostgreSQL 15 with PL/Python, Chromium for the web page tests, and Java 17 with
# PostgreSQL's JDBC driver for the Spark jobs.
set -euo pipefail
packages=(postgresql-15 postgresql-plpython3-15 chromium chromium-driver openjdk-17-jre-headless
          libpostgresql-jdbc-java)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing Debian packages: ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
