//! The chain file (`LIVE_FILTER_CHAIN`): an ordered list of plugins with
//! their configuration, failure policy and limits.
//!
//! ```toml
//! [[plugin]]
//! name = "allowlist"                        # default: the file name
//! path = "plugins/attributes_allowlist.wasm" # relative to this file
//! policy = "fail-open"                      # default "fail-closed"
//! timeout_ms = 50                           # per call, default 100
//! memory_limit_bytes = 8388608              # default 16 MiB
//! [plugin.config]                           # handed to the plugin's init as JSON
//! keep = ["239", "66"]
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Where the build put the shipped plugins (`<target>/plugins`).
#[cfg(feature = "test-util")]
pub const PLUGIN_DIR: &str = env!("LIVECAST_PLUGIN_DIR");

/// The shipped pass-through plugin: the chain when `LIVE_FILTER_CHAIN` is unset.
pub static PASSTHROUGH: &[u8] = include_bytes!(concat!(
    env!("LIVECAST_PLUGIN_DIR"),
    "/plugin_passthrough.wasm"
));

/// Default per-call deadline.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);
/// Default memory cap per plugin instance.
pub const DEFAULT_MEMORY_LIMIT: usize = 16 << 20;
/// Largest memory cap a chain file may ask for.
pub const MAX_MEMORY_LIMIT: usize = 256 << 20;
/// Default cap on a module's size.
pub const DEFAULT_MAX_MODULE_BYTES: usize = 8 << 20;

/// What happens to a record a plugin failed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Drop it: a filter may exist to hide something.
    #[default]
    FailClosed,
    /// Pass it on unchanged.
    FailOpen,
}

/// One plugin of a chain, ready to compile.
#[derive(Clone)]
pub struct PluginSpec {
    pub name: String,
    /// Where it came from, for messages.
    pub origin: String,
    pub wasm: Vec<u8>,
    pub config_json: String,
    pub policy: Policy,
    pub timeout: Duration,
    pub memory_limit: usize,
}

impl fmt::Debug for PluginSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginSpec")
            .field("name", &self.name)
            .field("origin", &self.origin)
            .field("wasm_bytes", &self.wasm.len())
            .field("policy", &self.policy)
            .finish()
    }
}

/// A whole chain, in order.
#[derive(Debug, Clone)]
pub struct ChainSpec {
    pub plugins: Vec<PluginSpec>,
    pub max_module_bytes: usize,
}

/// Why a chain file cannot be used.
#[derive(Debug)]
pub struct ChainError(pub String);

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ChainError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    max_module_bytes: Option<usize>,
    #[serde(default, rename = "plugin")]
    plugins: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: Option<String>,
    path: PathBuf,
    #[serde(default)]
    policy: Policy,
    timeout_ms: Option<u64>,
    memory_limit_bytes: Option<usize>,
    config: Option<toml::Table>,
}

impl ChainSpec {
    /// The default chain: the shipped pass-through plugin alone.
    pub fn default_chain() -> ChainSpec {
        ChainSpec {
            plugins: vec![PluginSpec {
                name: "passthrough".into(),
                origin: "built-in".into(),
                wasm: PASSTHROUGH.to_vec(),
                config_json: "{}".into(),
                policy: Policy::FailOpen,
                timeout: DEFAULT_TIMEOUT,
                memory_limit: DEFAULT_MEMORY_LIMIT,
            }],
            max_module_bytes: DEFAULT_MAX_MODULE_BYTES,
        }
    }

    /// Reads a chain file and the modules it names.
    pub fn read(path: &Path) -> Result<ChainSpec, ChainError> {
        let err = |m: String| ChainError(format!("filter chain {}: {m}", path.display()));
        let text =
            std::fs::read_to_string(path).map_err(|e| err(format!("cannot read it: {e}")))?;
        let file: File =
            toml::from_str(&text).map_err(|e| err(format!("invalid TOML: {}", e.message())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let max_module_bytes = file.max_module_bytes.unwrap_or(DEFAULT_MAX_MODULE_BYTES);
        let mut plugins = Vec::with_capacity(file.plugins.len());
        for (i, e) in file.plugins.into_iter().enumerate() {
            let wasm_path = base.join(&e.path);
            let name = e.name.clone().unwrap_or_else(|| {
                e.path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| format!("plugin-{}", i + 1))
            });
            let entry = |m: String| {
                err(format!(
                    "plugin #{} \"{name}\" ({}): {m}",
                    i + 1,
                    wasm_path.display()
                ))
            };
            if plugins.iter().any(|p: &PluginSpec| p.name == name) {
                return Err(entry(
                    "another plugin has this name; names label metrics and must be unique".into(),
                ));
            }
            let memory_limit = e.memory_limit_bytes.unwrap_or(DEFAULT_MEMORY_LIMIT);
            if !(64 << 10..=MAX_MEMORY_LIMIT).contains(&memory_limit) {
                return Err(entry(format!(
                    "memory_limit_bytes must be between 65536 and {MAX_MEMORY_LIMIT}"
                )));
            }
            let timeout =
                Duration::from_millis(e.timeout_ms.unwrap_or(DEFAULT_TIMEOUT.as_millis() as u64));
            if timeout.is_zero() || timeout > Duration::from_secs(10) {
                return Err(entry("timeout_ms must be between 1 and 10000".into()));
            }
            let meta = std::fs::metadata(&wasm_path)
                .map_err(|e| entry(format!("cannot read the module: {e}")))?;
            if meta.len() > max_module_bytes as u64 {
                return Err(entry(format!(
                    "the module is {} bytes, over max_module_bytes ({max_module_bytes})",
                    meta.len()
                )));
            }
            let wasm = std::fs::read(&wasm_path)
                .map_err(|e| entry(format!("cannot read the module: {e}")))?;
            let config_json = match &e.config {
                Some(t) => serde_json::to_string(t)
                    .map_err(|e| entry(format!("config is not JSON-compatible: {e}")))?,
                None => "{}".to_owned(),
            };
            plugins.push(PluginSpec {
                origin: wasm_path.display().to_string(),
                name,
                wasm,
                config_json,
                policy: e.policy,
                timeout,
                memory_limit,
            });
        }
        Ok(ChainSpec {
            plugins,
            max_module_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn tmpdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("livecast-chain-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn reads_entries_relative_to_the_file() {
        let d = tmpdir();
        std::fs::write(d.join("a.wasm"), b"\0asm").unwrap();
        let chain = write(
            &d,
            "chain.toml",
            r#"
[[plugin]]
path = "a.wasm"
policy = "fail-open"
timeout_ms = 20
[plugin.config]
keep = ["66"]
"#,
        );
        let spec = ChainSpec::read(&chain).unwrap();
        assert_eq!(spec.plugins.len(), 1);
        let p = &spec.plugins[0];
        assert_eq!(
            (p.name.as_str(), p.policy, p.timeout),
            ("a", Policy::FailOpen, Duration::from_millis(20))
        );
        assert_eq!(p.config_json, r#"{"keep":["66"]}"#);
        assert_eq!(p.memory_limit, DEFAULT_MEMORY_LIMIT);
    }

    #[test]
    fn errors_name_the_entry() {
        let d = tmpdir();
        std::fs::write(d.join("a.wasm"), b"\0asm").unwrap();
        let cases = [
            (
                "[[plugin]]\npath = \"missing.wasm\"\n",
                "plugin #1 \"missing\"",
            ),
            (
                "[[plugin]]\npath = \"a.wasm\"\npolicy = \"maybe\"\n",
                "invalid TOML",
            ),
            (
                "[[plugin]]\npath = \"a.wasm\"\n[[plugin]]\npath = \"a.wasm\"\n",
                "plugin #2 \"a\"",
            ),
            (
                "[[plugin]]\npath = \"a.wasm\"\nmemory_limit_bytes = 1\n",
                "memory_limit_bytes",
            ),
            (
                "[[plugin]]\npath = \"a.wasm\"\ncolour = 1\n",
                "unknown field",
            ),
        ];
        for (text, want) in cases {
            let e = ChainSpec::read(&write(&d, "c.toml", text))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
