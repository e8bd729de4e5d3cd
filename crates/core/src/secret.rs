//! [`Secret`]: a password, token or key that must never be printed.

use std::fmt;
use std::path::Path;

use crate::{Error, Result};

/// A password, token or key. Its `Debug` and `Display` print `***`, so a
/// secret inside a config struct, an error or a log field never shows;
/// [`Secret::expose`] is the one way to read it, at the call that hands it
/// to a client library.
///
/// ```
/// let s = custody_core::Secret::new("hunter2");
/// assert_eq!(format!("{s} {s:?}"), "*** ***");
/// assert_eq!(s.expose(), "hunter2");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the client library that needs it. Never
    /// format it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Read a secret from `path`: the whole file, without its trailing line
    /// break(s). `what` names the setting in errors (e.g.
    /// `nats.password-file`); the error names the file, never its content.
    pub fn from_file(what: &str, path: &Path) -> Result<Secret> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!(
                "{what} {}: cannot read the secret ({e}); point it at a readable file that holds only the secret",
                path.display()
            ))
        })?;
        let value = text.trim_end_matches(['\n', '\r']);
        if value.is_empty() {
            return Err(Error::Config(format!(
                "{what} {}: the file is empty; write the secret into it",
                path.display()
            )));
        }
        Ok(Secret(value.to_owned()))
    }

    /// Read a secret from the environment variable `var`. `what` names the
    /// setting in errors; the error names the variable, never its value.
    pub fn from_env(what: &str, var: &str) -> Result<Secret> {
        match std::env::var(var) {
            Ok(v) if !v.is_empty() => Ok(Secret(v)),
            Ok(_) => Err(Error::Config(format!(
                "{what}: environment variable {var} is empty; set it to the secret"
            ))),
            Err(e) => Err(Error::Config(format!(
                "{what}: environment variable {var} is not usable ({e}); set it to the secret or remove {what}"
            ))),
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_formats_its_value() {
        let s = Secret::new("p4ss-w0rd");
        let shown = format!("{s} {s:?} {:?} {:#?}", Some(&s), vec![s.clone()]);
        assert!(!shown.contains("p4ss"), "{shown}");
        assert_eq!(s.expose(), "p4ss-w0rd");
    }

    #[test]
    fn reads_a_file_without_its_line_break_and_names_a_missing_one() {
        let dir = std::env::temp_dir().join(format!("custody-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        assert_eq!(Secret::from_file("x", &file).unwrap().expose(), "s3cret");
        std::fs::write(&file, "\n").unwrap();
        let empty = Secret::from_file("x", &file).unwrap_err().to_string();
        assert!(empty.contains("empty"), "{empty}");
        let missing = Secret::from_file("nats.password-file", &dir.join("nope"))
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("nats.password-file") && missing.contains("nope"),
            "{missing}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
