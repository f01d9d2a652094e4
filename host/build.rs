//! Builds the shipped filter plugins (`plugins/*`) for wasm32 as part of the
//! host's build, so `cargo build` and `cargo test` need no manual step.
//!
//! The modules land in `<target>/plugins/`: the host embeds the pass-through
//! plugin (the default chain) from there, and tests and chain files load the
//! others from there.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const WASM_TARGET: &str = "wasm32-unknown-unknown";

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest
        .parent()
        .expect("host/ sits in the workspace")
        .to_path_buf();
    let target = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let target = if target.is_absolute() {
        target
    } else {
        root.join(target)
    };

    println!("cargo:rerun-if-changed={}", root.join("plugins").display());
    println!(
        "cargo:rerun-if-changed={}",
        root.join("plugin-sdk").display()
    );
    // The lock file for versions, the manifest for the `plugin` profile.
    for file in ["Cargo.lock", "Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");

    let plugins = plugin_crates(&root.join("plugins"));
    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(&root)
        .args(["build", "--target", WASM_TARGET, "--profile", "plugin"])
        .arg("--target-dir")
        // Its own target directory: the outer build holds the lock on the
        // main one, and sharing it would deadlock.
        .arg(target.join("wasm-plugins"));
    for p in &plugins {
        cmd.args(["-p", &format!("plugin-{p}")]);
    }
    // Flags and wrappers meant for the host (clippy, coverage, sanitizers)
    // do not suit the wasm target.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("run cargo to build the wasm plugins");
    if !status.success() {
        panic!(
            "building the filter plugins for {WASM_TARGET} failed; is the target installed? \
             (rustup target add {WASM_TARGET})"
        );
    }

    let built = target.join("wasm-plugins").join(WASM_TARGET).join("plugin");
    let out = target.join("plugins");
    std::fs::create_dir_all(&out).expect("create target/plugins");
    for p in &plugins {
        let file = format!("plugin_{}.wasm", p.replace('-', "_"));
        let from = built.join(&file);
        let to = out.join(&file);
        // Copy only when changed, so a running host's hot reload does not see
        // a new file on every build.
        let fresh = std::fs::read(&from).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
        if std::fs::read(&to).ok().as_deref() != Some(&fresh[..]) {
            std::fs::write(&to, &fresh).unwrap_or_else(|e| panic!("{}: {e}", to.display()));
        }
    }
    println!("cargo:rustc-env=LIVECAST_PLUGIN_DIR={}", out.display());
}

/// The plugin crates: every directory of `plugins/` with a Cargo.toml.
fn plugin_crates(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().join("Cargo.toml").is_file())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}
