#!/usr/bin/env bash
# Fuzzes the decoding of stored bitmaps (allocators/fuzz) for FUZZ_SECONDS (default 60).
# Needs a nightly toolchain (rustup toolchain install nightly) and cargo-fuzz, which it installs.
set -euo pipefail
cd "$(dirname "$0")/../allocators"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
exec cargo +nightly fuzz run decode_stored -- -max_total_time="${FUZZ_SECONDS:-60}"
