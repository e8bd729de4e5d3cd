//! The binary's configuration: one TOML file, every key overridable by
//! `CUSTODY_<SECTION>__<KEY>` environment variables. Only the binary reads
//! files and the environment; libraries take the structs.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// Whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Relay settings.
    pub relay: custody::RelayConfig,
    /// Consumer settings.
    pub consumer: custody::ConsumerConfig,
    /// How to authenticate to NATS and secure the link (docs/SECURITY.md);
    /// secrets are named files or environment variables, never inline.
    pub nats: custody::nats::ConnectOptions,
}

/// Load `path` (if given) and apply `CUSTODY_*` overrides.
pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
    let mut value = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read config file {}", p.display()))?;
            text.parse::<toml::Table>()
                .with_context(|| format!("config file {} is not valid TOML", p.display()))?
        }
        None => toml::Table::new(),
    };
    apply_env(&mut value, std::env::vars())?;
    let cfg = Config::deserialize(toml::Value::Table(value)).map_err(|e| {
        anyhow::anyhow!(
            "invalid configuration: {e}. See docs/CONFIG.md for the keys and their forms"
        )
    })?;
    cfg.validate()?;
    Ok(cfg)
}

impl Config {
    /// Every value in its allowed range (docs/CONFIG.md); the error names
    /// each key that is not, in every section, with its range.
    pub fn validate(&self) -> anyhow::Result<()> {
        let problems: Vec<String> = [
            self.relay.validate(),
            self.consumer.validate(),
            self.nats.validate(),
        ]
        .into_iter()
        .filter_map(Result::err)
        .map(|e| crate::ops::config_text(&e))
        .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("invalid configuration: {}", problems.join("\n  "))
        }
    }
}

/// `CUSTODY_RELAY__BATCH_SIZE=200` sets `relay.batch-size = 200`. Values are
/// read as TOML scalars where they parse (numbers, booleans), else as strings.
fn apply_env(
    table: &mut toml::Table,
    vars: impl Iterator<Item = (String, String)>,
) -> anyhow::Result<()> {
    for (k, v) in vars {
        let Some(rest) = k.strip_prefix("CUSTODY_") else {
            continue;
        };
        if !rest.contains("__") {
            continue; // CUSTODY_CONFIG, CUSTODY_LOG, ... are not config keys
        }
        let path: Vec<String> = rest
            .split("__")
            .map(|p| p.to_ascii_lowercase().replace('_', "-"))
            .collect();
        let scalar = format!("x = {v}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("x"))
            .unwrap_or(toml::Value::String(v.clone()));
        let mut cur = &mut *table;
        for (i, part) in path.iter().enumerate() {
            if i + 1 == path.len() {
                cur.insert(part.clone(), scalar.clone());
            } else {
                let next = cur
                    .entry(part.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                cur = next
                    .as_table_mut()
                    .with_context(|| format!("{k}: {part} is not a section"))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_file_values() {
        let mut t: toml::Table = "[relay]\nbatch-size = 10\n".parse().unwrap();
        apply_env(
            &mut t,
            vec![
                ("CUSTODY_RELAY__BATCH_SIZE".to_owned(), "200".to_owned()),
                ("CUSTODY_RELAY__POLL_INTERVAL".to_owned(), "50ms".to_owned()),
                ("CUSTODY_LOG".to_owned(), "debug".to_owned()),
            ]
            .into_iter(),
        )
        .unwrap();
        let cfg = Config::deserialize(toml::Value::Table(t)).unwrap();
        assert_eq!(cfg.relay.batch_size, 200);
        assert_eq!(
            cfg.relay.poll_interval,
            std::time::Duration::from_millis(50)
        );
    }

    #[test]
    fn nats_section_from_the_environment() {
        let mut t = toml::Table::new();
        apply_env(
            &mut t,
            vec![
                (
                    "CUSTODY_NATS__CREDS_FILE".to_owned(),
                    "/run/secrets/relay.creds".to_owned(),
                ),
                ("CUSTODY_NATS__REQUIRE_TLS".to_owned(), "true".to_owned()),
                ("CUSTODY_NATS".to_owned(), "nats://x:4222".to_owned()),
            ]
            .into_iter(),
        )
        .unwrap();
        let cfg = Config::deserialize(toml::Value::Table(t)).unwrap();
        assert_eq!(
            cfg.nats.creds_file.as_deref(),
            Some(std::path::Path::new("/run/secrets/relay.creds"))
        );
        assert!(cfg.nats.require_tls);
        let missing = cfg.validate().unwrap_err().to_string();
        assert!(
            missing.contains("nats.creds-file /run/secrets/relay.creds"),
            "{missing}"
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let t: toml::Table = "[relay]\nbatch-sise = 10\n".parse().unwrap();
        let err = Config::deserialize(toml::Value::Table(t)).unwrap_err();
        assert!(err.to_string().contains("batch-sise"), "{err}");
    }
}
