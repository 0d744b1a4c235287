#!/usr/bin/env bash
# Installs Azurite (Microsoft's Azure Storage emulator, used by the export tests)
# into the project-local .cache/azurite, if it is not there yet. Needs node and npm.
set -euo pipefail
AZURITE_VERSION=3.37.0
cd "$(dirname "$0")/.."
[ -x .cache/azurite/node_modules/.bin/azurite ] && exit 0
command -v npm >/dev/null || { echo "npm is missing: install Node.js 20 (apt-get install nodejs npm)" >&2; exit 1; }
echo "installing azurite@${AZURITE_VERSION} into .cache/azurite"
mkdir -p .cache/azurite
npm install --no-audit --no-fund --prefix .cache/azurite "azurite@${AZURITE_VERSION}"
