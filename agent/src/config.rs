//! `agent.toml`: the host's own settings (not the project's).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const DEFAULT_CONFIG: &str = "/etc/deploy-agent/agent.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/deploy-agent";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Label value on every container, network and volume this agent
    /// creates, and the prefix of their names. Several agents on one machine
    /// (tests, demos) need distinct instances.
    pub instance: String,
    /// Releases kept per project (images and configuration snapshot).
    pub retain: usize,
    /// How often the daemon checks for drift, in seconds.
    pub reconcile_interval_secs: u64,
    /// Registry credentials by registry host (`host[:port]`).
    pub registries: BTreeMap<String, RegistryAuth>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryAuth {
    pub username: String,
    pub password: String,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            instance: "default".into(),
            retain: 10,
            reconcile_interval_secs: 5,
            registries: BTreeMap::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the agent config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid agent config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl AgentConfig {
    /// Load `path`; a missing file is the defaults only when `required` is false.
    pub fn load(path: &Path, required: bool) -> Result<AgentConfig, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(AgentConfig::default());
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<AgentConfig, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let cfg: AgentConfig = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let valid_instance = !cfg.instance.is_empty()
            && cfg.instance.len() <= 32
            && cfg
                .instance
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !valid_instance {
            return Err(invalid(format!(
                "key `instance`: {:?} must be 1-32 characters of a-z, 0-9 and -",
                cfg.instance
            )));
        }
        if cfg.retain < 2 {
            return Err(invalid(format!(
                "key `retain`: {} is too small; keep at least 2 releases (current and previous)",
                cfg.retain
            )));
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_when_the_default_file_is_missing() {
        let cfg = AgentConfig::load(Path::new("/nonexistent/agent.toml"), false).unwrap();
        assert_eq!(cfg.instance, "default");
        assert_eq!(cfg.retain, 10);
    }

    #[test]
    fn a_named_file_must_exist() {
        let err = AgentConfig::load(Path::new("/nonexistent/agent.toml"), true).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/agent.toml"));
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = AgentConfig::parse(Path::new("a.toml"), "instance = \"x\"\nretian = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("retian"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn registries_and_bad_values() {
        let cfg = AgentConfig::parse(
            Path::new("a.toml"),
            "[registries.\"127.0.0.1:5001\"]\nusername = \"u\"\npassword = \"p\"\n",
        )
        .unwrap();
        assert_eq!(cfg.registries["127.0.0.1:5001"].username, "u");
        assert!(AgentConfig::parse(Path::new("a"), "instance = \"Bad_Name\"").is_err());
        assert!(AgentConfig::parse(Path::new("a"), "retain = 1").is_err());
    }
}
