//! What the CLI's test files share.
#![allow(dead_code, missing_docs)]

/// A temporary directory, removed on drop (`tempfile`), with `file` naming
/// a path in it.
pub struct Dir(pub tempfile::TempDir);

impl Dir {
    pub fn new(tag: &str) -> anyhow::Result<Dir> {
        Ok(Dir(tempfile::Builder::new()
            .prefix(&format!("custody-{tag}-"))
            .tempdir()?))
    }
    pub fn file(&self, name: &str) -> String {
        self.0.path().join(name).to_string_lossy().into_owned()
    }
}
