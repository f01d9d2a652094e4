#!/usr/bin/env bash
# Proves that the SDK stands alone: copies plugin-sdk/ out of the livecast
# workspace and builds and tests it there natively, then builds a plugin
# crate that depends on the copy (examples/minimal.rs) for wasm32. A
# manifest that inherits from the workspace, or code that reaches outside
# the crate, fails here.
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

# A plugin author's crate beside the copy, outside any workspace, built for
# wasm32 with the settings plugin-guide.md recommends. (Not `cargo build
# --example`: that would build the dev-dependencies for wasm32 too.)
mkdir "$copy/plugin"
cat >"$copy/plugin/Cargo.toml" <<'TOML'
[package]
name = "standalone-plugin"
version = "0.1.0"
edition = "2024"

[lib]
crate-type = ["cdylib"]
path = "../plugin-sdk/examples/minimal.rs"

[dependencies]
livecast-plugin-sdk = { path = "../plugin-sdk" }

[profile.release]
opt-level = 3
lto = true
codegen-units = 1
panic = "abort"
strip = true
TOML
cp Cargo.lock "$copy/plugin/"
(cd "$copy/plugin" && cargo build --quiet --release --target wasm32-unknown-unknown)
wasm="$CARGO_TARGET_DIR/wasm32-unknown-unknown/release/standalone_plugin.wasm"
test -s "$wasm"
# What `cargo package` would ship must also be complete.
(cd "$root" && cargo package --quiet -p livecast-plugin-sdk --list --allow-dirty >/dev/null)
echo "plugin-sdk builds standalone: $(wc -c <"$wasm") bytes of wasm for examples/minimal.rs"
