#!/usr/bin/env bash
# The test suite: builds with optimisation (the model tests run real forward/backward passes,
# far too slow unoptimised) and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
swift build --build-tests -c release -Xswiftc -enable-testing
swift test --skip-build -c release -Xswiftc -enable-testing "$@"
