#!/usr/bin/env bash
# Set up (once) and stream a Medusa chat answer from the bundled demo model, with its statistics.
#   scripts/demo.sh ["your question"]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/medusa-edge generate --chat -p "${1:-Tell me a story about a cat named Tom.}" -n 128
