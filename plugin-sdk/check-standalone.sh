#!/usr/bin/env bash
# Proves that the SDK stands alone: copies plugin-sdk/ out of the livecast
# workspace and builds and tests it there, natively and for wasm32 (the
# library and a complete plugin, examples/minimal.rs). A manifest that
# inherits from the workspace, or code that reaches outside the crate,
# fails here.
#
# Usage: plugin-sdk/check-standalone.sh   (CI runs it from .ci/run)
set -euo pipefail
sdk="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$sdk")"
copy="$(mktemp -d)"
trap 'rm -rf "$copy"' EXIT

cp -R "$sdk" "$copy/plugin-sdk"
# The workspace's lock file pins the same dependency versions (cargo drops
# the entries the SDK does not use).
cp "$root/Cargo.lock" "$copy/plugin-sdk/"
cd "$copy/plugin-sdk"
# Its own target directory under the workspace's, kept between runs: a
# rebuild is incremental, and nothing is shared with the workspace build.
export CARGO_TARGET_DIR="$root/target/sdk-standalone"

cargo test --lib --examples --quiet
cargo build --quiet --release --target wasm32-unknown-unknown --lib --example minimal
wasm="$CARGO_TARGET_DIR/wasm32-unknown-unknown/release/examples/minimal.wasm"
test -s "$wasm"
# What `cargo package` would ship must also be complete.
(cd "$root" && cargo package --quiet -p livecast-plugin-sdk --list --allow-dirty >/dev/null)
echo "plugin-sdk builds standalone: $(wc -c <"$wasm") bytes of wasm for examples/minimal.rs"
