//! The binary's configuration: one TOML file, every key overridable by
//! `CUSTODY_<SECTION>__<KEY>` environment variables. Only the binary reads
//! files and the environment; libraries take the structs.

use std::collections::BTreeMap;
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

/// Where a key's value came from, for error messages.
type Origins = BTreeMap<String, String>;

/// Load `path` (if given) and apply `CUSTODY_*` overrides.
///
/// Every problem is reported at once, one line each, naming the key, where
/// its value came from (the file or the environment variable) and the
/// allowed form (docs/CONFIG.md).
pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
    let mut origins = Origins::new();
    let mut value = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| {
                format!(
                    "cannot read config file {} (given by --config or CUSTODY_CONFIG)",
                    p.display()
                )
            })?;
            let table = text
                .parse::<toml::Table>()
                .map_err(|e| anyhow::anyhow!("{}", syntax_error(p, &text, &e)))?;
            let file = format!("config file {}", p.display());
            record_origins(&table, "", &file, &mut origins);
            table
        }
        None => toml::Table::new(),
    };
    apply_env(&mut value, std::env::vars(), &mut origins)?;
    let defaults = match toml::Value::try_from(Config::default()) {
        Ok(toml::Value::Table(t)) => t,
        _ => anyhow::bail!("internal error: the default configuration does not serialize"),
    };
    let mut problems = Vec::new();
    check_table(&mut value, &defaults, "", &origins, &mut problems);
    if !problems.is_empty() {
        anyhow::bail!("{}", problem_list(&problems));
    }
    // every key was checked above; this is a last resort
    let cfg = Config::deserialize(toml::Value::Table(value))
        .map_err(|e| anyhow::anyhow!("{}", problem_list(&[one_line(&e.to_string())])))?;
    let problems: Vec<String> = [
        cfg.relay.validate(),
        cfg.consumer.validate(),
        cfg.nats.validate(),
    ]
    .into_iter()
    .filter_map(Result::err)
    .flat_map(|e| range_problems(&crate::ops::config_text(&e)))
    .map(|p| {
        let key = p.split([' ', ':']).next().unwrap_or_default();
        format!("{}: {p}", origin_of(key, &origins))
    })
    .collect();
    if !problems.is_empty() {
        anyhow::bail!("{}", problem_list(&problems));
    }
    Ok(cfg)
}

/// The error for a file that is not TOML: one line with the file, the
/// line and column, and what the parser expected.
fn syntax_error(path: &Path, text: &str, e: &toml::de::Error) -> String {
    let at = e
        .span()
        .map(|span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            format!(" at line {line}, column {column}")
        })
        .unwrap_or_default();
    format!(
        "config file {} is not valid TOML{at}: {}; keys are written `key = value` under a `[section]` header (docs/CONFIG.md)",
        path.display(),
        one_line(e.message())
    )
}

/// The problems found, one per line, under one heading.
fn problem_list(problems: &[String]) -> String {
    let mut out = format!(
        "invalid configuration ({} problem{}; docs/CONFIG.md lists every key and its allowed form):",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems {
        out.push_str("\n  - ");
        out.push_str(p);
    }
    out
}

/// `text` on one line (parsers' messages can span several).
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Where the value of `key` (`relay.batch-size`) came from.
fn origin_of(key: &str, origins: &Origins) -> String {
    origins
        .get(key)
        .cloned()
        .unwrap_or_else(|| "default value".to_owned())
}

/// Note `origin` for every key in `table` (under `prefix`).
fn record_origins(table: &toml::Table, prefix: &str, origin: &str, origins: &mut Origins) {
    for (k, v) in table {
        let key = join(prefix, k);
        if let toml::Value::Table(t) = v {
            record_origins(t, &key, origin, origins);
        }
        origins.insert(key, origin.to_owned());
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// The range check's problems (`relay.a = 0: …; relay.b = …. Fix the
/// [relay] section …`), one per item: each begins with its section's name.
fn range_problems(text: &str) -> Vec<String> {
    let body = text.split(". Fix the [").next().unwrap_or(text);
    let mut out: Vec<String> = Vec::new();
    for part in body.split("; ") {
        let starts_item = ["relay.", "consumer.", "nats"]
            .iter()
            .any(|s| part.starts_with(s));
        match out.last_mut() {
            // a "; " inside an item's explanation
            Some(last) if !starts_item => {
                last.push_str("; ");
                last.push_str(part);
            }
            _ => out.push(part.to_owned()),
        }
    }
    out
}

/// Compare `table` with the defaults' shape: unknown sections and keys,
/// values of the wrong type and values that do not parse (a duration
/// without a unit, a negative count) become problems, one per key. Values
/// from the environment that should be strings are made strings
/// (`CUSTODY_CONSUMER__NAME=123`).
fn check_table(
    table: &mut toml::Table,
    defaults: &toml::Table,
    prefix: &str,
    origins: &Origins,
    problems: &mut Vec<String>,
) {
    for (k, v) in table.iter_mut() {
        let key = join(prefix, k);
        let origin = origin_of(&key, origins);
        let Some(default) = defaults.get(k) else {
            // a key whose default is unset (`Option`) does not serialize, so
            // it is not among the defaults: serde says whether it is known
            let mut expected = None;
            if !prefix.is_empty() {
                match leaf_error(&key, v) {
                    None => continue,
                    Some(e) if !e.contains("unknown field") => {
                        problems.push(format!("{origin}: {key} = {v}: {e}"));
                        continue;
                    }
                    Some(e) => {
                        expected = e
                            .split_once("expected one of ")
                            .or_else(|| e.split_once("expected "))
                            .map(|(_, list)| {
                                let mut keys: Vec<String> = list
                                    .split(", ")
                                    .map(|k| k.trim_matches('`').to_owned())
                                    .collect();
                                keys.sort();
                                keys.join(", ")
                            })
                    }
                }
            }
            let (what, known): (&str, Vec<String>) = if prefix.is_empty() {
                (
                    "section",
                    defaults.keys().map(|s| format!("[{s}]")).collect(),
                )
            } else if let Some(list) = expected {
                ("key", vec![list])
            } else {
                ("key", defaults.keys().cloned().collect())
            };
            let shown = if prefix.is_empty() {
                format!("[{key}]")
            } else {
                key.clone()
            };
            let within = if prefix.is_empty() {
                "the sections are".to_owned()
            } else {
                format!("the keys of [{prefix}] are")
            };
            problems.push(format!(
                "{origin}: {shown} is not a known {what}; {within} {}",
                known.join(", ")
            ));
            continue;
        };
        if origin.starts_with("environment") && default.is_str() && !v.is_str() && !v.is_table() {
            *v = toml::Value::String(v.to_string());
        }
        match (v, default) {
            (toml::Value::Table(t), toml::Value::Table(d)) => {
                check_table(t, d, &key, origins, problems)
            }
            (v, d) if v.same_type(d) => {
                if let Some(e) = leaf_error(&key, v) {
                    problems.push(format!(
                        "{origin}: {key} = {v}: {e}; {}",
                        allowed_form(&key, d)
                    ));
                }
            }
            (v, d) => problems.push(format!(
                "{origin}: {key} = {v} is {}; {}",
                kind_of(v),
                allowed_form(&key, d)
            )),
        }
    }
}

/// Why the value `v` of `key` does not deserialize (all other keys at their
/// defaults), if it does not.
fn leaf_error(key: &str, v: &toml::Value) -> Option<String> {
    let mut root = toml::Table::new();
    let mut cur = &mut root;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            cur.insert((*part).to_owned(), v.clone());
        } else {
            cur = cur
                .entry(*part)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()?;
        }
    }
    Config::deserialize(toml::Value::Table(root))
        .err()
        .map(|e| one_line(e.message()))
}

fn kind_of(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "a whole number",
        toml::Value::Float(_) => "a decimal number",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date",
        toml::Value::Array(_) => "a list",
        toml::Value::Table(_) => "a section",
    }
}

/// What a value of `key` must look like, from its default `d`.
fn allowed_form(key: &str, d: &toml::Value) -> String {
    match d {
        toml::Value::String(s) if is_duration(s) => format!(
            "write a duration in quotes: a whole number with ms, s, m or h, e.g. {key} = {d}"
        ),
        toml::Value::String(_) => format!("write a string in quotes, e.g. {key} = {d}"),
        toml::Value::Integer(_) => format!("write a whole number, e.g. {key} = {d}"),
        toml::Value::Boolean(_) => format!("write true or false, e.g. {key} = {d}"),
        toml::Value::Table(t) => format!(
            "[{key}] is a section with the keys {}",
            t.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
        other => format!("e.g. {key} = {other}"),
    }
}

/// The defaults' durations serialize as `"<n>ms"`.
fn is_duration(s: &str) -> bool {
    s.strip_suffix("ms")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// `CUSTODY_RELAY__BATCH_SIZE=200` sets `relay.batch-size = 200`. Values are
/// read as TOML scalars where they parse (numbers, booleans), else as strings.
fn apply_env(
    table: &mut toml::Table,
    vars: impl Iterator<Item = (String, String)>,
    origins: &mut Origins,
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
            .filter(|x| !x.is_table() && !x.is_array())
            .unwrap_or(toml::Value::String(v.clone()));
        origins.insert(path.join("."), format!("environment variable {k}"));
        let mut cur = &mut *table;
        for (i, part) in path.iter().enumerate() {
            if i + 1 == path.len() {
                cur.insert(part.clone(), scalar.clone());
            } else {
                let next = cur
                    .entry(part.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                cur = next.as_table_mut().with_context(|| {
                    format!(
                        "environment variable {k}: {} is a key, not a section; \
                         write CUSTODY_<SECTION>__<KEY> (docs/CONFIG.md)",
                        path[..=i].join(".")
                    )
                })?;
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
            &mut Origins::new(),
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
            &mut Origins::new(),
        )
        .unwrap();
        let cfg = Config::deserialize(toml::Value::Table(t)).unwrap();
        assert_eq!(
            cfg.nats.creds_file.as_deref(),
            Some(std::path::Path::new("/run/secrets/relay.creds"))
        );
        assert!(cfg.nats.require_tls);
        let missing = cfg.nats.validate().unwrap_err().to_string();
        assert!(
            missing.contains("nats.creds-file /run/secrets/relay.creds"),
            "{missing}"
        );
    }

    #[test]
    fn optional_keys_are_known_and_misspelt_ones_listed() {
        let mut value: toml::Table =
            "[nats]\nuser = \"relay\"\npassword-file = \"/run/p\"\npasword-env = \"P\"\n"
                .parse()
                .unwrap();
        let defaults = match toml::Value::try_from(Config::default()).unwrap() {
            toml::Value::Table(t) => t,
            _ => unreachable!(),
        };
        let mut problems = Vec::new();
        check_table(&mut value, &defaults, "", &Origins::new(), &mut problems);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("nats.pasword-env is not a known key"),
            "{problems:?}"
        );
        assert!(problems[0].contains("password-env"), "{problems:?}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let t: toml::Table = "[relay]\nbatch-sise = 10\n".parse().unwrap();
        let err = Config::deserialize(toml::Value::Table(t)).unwrap_err();
        assert!(err.to_string().contains("batch-sise"), "{err}");
    }
}
