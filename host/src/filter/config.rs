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
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Where the build put the shipped plugins (`<target>/plugins`).
#[cfg(any(test, feature = "test-util"))]
pub const PLUGIN_DIR: &str = env!("LIVECAST_PLUGIN_DIR");

/// The shipped pass-through plugin: the chain when `LIVE_FILTER_CHAIN` is unset.
pub static PASSTHROUGH: &[u8] = include_bytes!(concat!(
    env!("LIVECAST_PLUGIN_DIR"),
    "/plugin_passthrough.wasm"
));

/// Default per-call deadline.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);
/// Longest per-call deadline a chain file may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(10);
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

/// Why a chain file cannot be used. Each level says its part (the file, the
/// entry) and leaves the cause to [`Error::source`](std::error::Error::source):
/// print it with a reporter that walks the chain (`{:#}` of `anyhow`).
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("filter chain {}: cannot read it", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("filter chain {}: invalid TOML", .path.display())]
    Toml {
        path: PathBuf,
        #[source]
        source: TomlError,
    },
    #[error("filter chain {}: plugin #{index} \"{name}\" ({})", .path.display(), .module.display())]
    Entry {
        path: PathBuf,
        /// 1-based, as an operator counts the `[[plugin]]` tables.
        index: usize,
        name: String,
        module: PathBuf,
        #[source]
        source: EntryError,
    },
}

/// What is wrong with one `[[plugin]]` entry.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("another plugin has this name; names label metrics and must be unique")]
    DuplicateName,
    #[error("memory_limit_bytes must be between 65536 and {MAX_MEMORY_LIMIT}, not {0}")]
    MemoryLimit(usize),
    #[error("timeout_ms must be between 1 and {max}, not {0}", max = MAX_TIMEOUT.as_millis())]
    Timeout(u64),
    #[error("cannot read the module")]
    ReadModule(#[source] io::Error),
    #[error(transparent)]
    TooLarge(#[from] TooLarge),
    #[error("config is not JSON-compatible")]
    Config(#[source] serde_json::Error),
}

/// A module over `max_module_bytes`: refused before it is read, and again
/// before it is compiled (a chain built in code has no file to measure).
#[derive(Debug, thiserror::Error)]
#[error("the module is {size} bytes, over max_module_bytes ({max})")]
pub struct TooLarge {
    pub size: u64,
    pub max: usize,
}

/// A TOML syntax or schema error on one line: what, and where. (The parser's
/// own `Display` quotes the file over several lines, which a log line should
/// not carry.)
#[derive(Debug)]
pub struct TomlError {
    /// Boxed: the parser's error is large, and errors travel by value.
    error: Box<toml::de::Error>,
    /// 1-based line and column of the error, when the parser knows it.
    at: Option<(usize, usize)>,
}

impl TomlError {
    fn new(error: toml::de::Error, text: &str) -> Self {
        let at = error.span().and_then(|span| {
            let before = text.get(..span.start)?;
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            Some((line, column))
        });
        Self {
            error: Box::new(error),
            at,
        }
    }
}

impl fmt::Display for TomlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut lines = self
            .error
            .message()
            .lines()
            .filter(|l| !l.trim().is_empty());
        if let Some(first) = lines.next() {
            f.write_str(first.trim())?;
        }
        for more in lines {
            write!(f, "; {}", more.trim())?;
        }
        if let Some((line, column)) = self.at {
            write!(f, " (line {line}, column {column})")?;
        }
        Ok(())
    }
}

impl std::error::Error for TomlError {}

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
        let text = std::fs::read_to_string(path).map_err(|source| ChainError::Read {
            path: path.to_owned(),
            source,
        })?;
        let file: File = toml::from_str(&text).map_err(|e| ChainError::Toml {
            path: path.to_owned(),
            source: TomlError::new(e, &text),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let max_module_bytes = file.max_module_bytes.unwrap_or(DEFAULT_MAX_MODULE_BYTES);
        let mut plugins = Vec::with_capacity(file.plugins.len());
        for (i, e) in file.plugins.into_iter().enumerate() {
            let module = base.join(&e.path);
            let name = e.name.clone().unwrap_or_else(|| {
                e.path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| format!("plugin-{}", i + 1))
            });
            match entry(e, &name, &module, max_module_bytes, &plugins) {
                Ok(plugin) => plugins.push(plugin),
                Err(source) => {
                    return Err(ChainError::Entry {
                        path: path.to_owned(),
                        index: i + 1,
                        name,
                        module,
                        source,
                    });
                }
            }
        }
        Ok(ChainSpec {
            plugins,
            max_module_bytes,
        })
    }
}

/// Checks one entry and reads its module.
fn entry(
    e: Entry,
    name: &str,
    module: &Path,
    max_module_bytes: usize,
    before: &[PluginSpec],
) -> Result<PluginSpec, EntryError> {
    if before.iter().any(|p| p.name == name) {
        return Err(EntryError::DuplicateName);
    }
    let memory_limit = e.memory_limit_bytes.unwrap_or(DEFAULT_MEMORY_LIMIT);
    if !(64 << 10..=MAX_MEMORY_LIMIT).contains(&memory_limit) {
        return Err(EntryError::MemoryLimit(memory_limit));
    }
    let timeout_ms = e.timeout_ms.unwrap_or(DEFAULT_TIMEOUT.as_millis() as u64);
    let timeout = Duration::from_millis(timeout_ms);
    if timeout.is_zero() || timeout > MAX_TIMEOUT {
        return Err(EntryError::Timeout(timeout_ms));
    }
    let size = std::fs::metadata(module)
        .map_err(EntryError::ReadModule)?
        .len();
    if size > max_module_bytes as u64 {
        return Err(TooLarge {
            size,
            max: max_module_bytes,
        }
        .into());
    }
    let wasm = std::fs::read(module).map_err(EntryError::ReadModule)?;
    let config_json = match &e.config {
        Some(t) => serde_json::to_string(t).map_err(EntryError::Config)?,
        None => "{}".to_owned(),
    };
    Ok(PluginSpec {
        origin: module.display().to_string(),
        name: name.to_owned(),
        wasm,
        config_json,
        policy: e.policy,
        timeout,
        memory_limit,
    })
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
    fn errors_name_the_file_and_the_entry_and_keep_the_cause() {
        let d = tmpdir();
        std::fs::write(d.join("a.wasm"), b"\0asm").unwrap();
        let file = d.join("c.toml");
        let (f, dir) = (file.display(), d.display());
        let cases = [
            (
                "[[plugin]]\npath = \"missing.wasm\"\n",
                format!(
                    "filter chain {f}: plugin #1 \"missing\" ({dir}/missing.wasm): cannot read the module: No such file or directory (os error 2)"
                ),
            ),
            (
                "[[plugin]]\npath = \"a.wasm\"\npolicy = \"maybe\"\n",
                format!(
                    "filter chain {f}: invalid TOML: unknown variant `maybe`, expected `fail-closed` or `fail-open` (line 3, column 10)"
                ),
            ),
            (
                "[[plugin]]\npath = \"a.wasm\"\n[[plugin]]\npath = \"a.wasm\"\n",
                format!(
                    "filter chain {f}: plugin #2 \"a\" ({dir}/a.wasm): another plugin has this name; names label metrics and must be unique"
                ),
            ),
            (
                "[[plugin]]\npath = \"a.wasm\"\nmemory_limit_bytes = 1\n",
                format!(
                    "filter chain {f}: plugin #1 \"a\" ({dir}/a.wasm): memory_limit_bytes must be between 65536 and 268435456, not 1"
                ),
            ),
            (
                "[[plugin]]\npath = \"a.wasm\"\ntimeout_ms = 10001\n",
                format!(
                    "filter chain {f}: plugin #1 \"a\" ({dir}/a.wasm): timeout_ms must be between 1 and 10000, not 10001"
                ),
            ),
            (
                "max_module_bytes = 2\n[[plugin]]\npath = \"a.wasm\"\n",
                format!(
                    "filter chain {f}: plugin #1 \"a\" ({dir}/a.wasm): the module is 4 bytes, over max_module_bytes (2)"
                ),
            ),
        ];
        for (text, want) in cases {
            let e = ChainSpec::read(&write(&d, "c.toml", text)).unwrap_err();
            assert_eq!(format!("{:#}", anyhow::Error::new(e)), want, "{text}");
        }
        // The parser's message is kept whole, on one line.
        let e = ChainSpec::read(&write(
            &d,
            "c.toml",
            "[[plugin]]\npath = \"a.wasm\"\ncolour = 1\n",
        ))
        .unwrap_err();
        let e = format!("{:#}", anyhow::Error::new(e));
        assert!(
            e.contains("invalid TOML: unknown field `colour`, expected one of"),
            "{e}"
        );
        assert!(
            e.ends_with("(line 3, column 1)") && !e.contains('\n'),
            "{e}"
        );
        // Causes are sources, not text: an operator's tooling can walk them.
        let e = ChainSpec::read(&write(&d, "c.toml", "[[plugin]]\npath = \"gone.wasm\"\n"))
            .unwrap_err();
        let io = std::error::Error::source(&e)
            .and_then(std::error::Error::source)
            .and_then(|e| e.downcast_ref::<io::Error>())
            .expect("the io::Error, two levels down");
        assert_eq!(io.kind(), io::ErrorKind::NotFound);
    }
}
