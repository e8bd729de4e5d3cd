//! The documentation cannot drift from code that compiles: every ```rust
//! block in README.md and docs/*.md must be a contiguous run of lines
//! (compared trimmed) of a file under examples/, which CI builds and runs
//! end to end; and every `custody = { … features = [...] }` line in a
//! ```toml block may only name features crates/custody/Cargo.toml has.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// A fenced block of a markdown file.
struct Block {
    doc: String,
    /// 1-based line of the opening fence.
    line: usize,
    lang: String,
    lines: Vec<String>,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// README.md and every docs/*.md, as (name, text).
fn docs() -> Vec<(String, String)> {
    let root = root();
    let mut paths = vec![root.join("README.md")];
    let mut in_docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    in_docs.retain(|p| p.extension().is_some_and(|e| e == "md"));
    in_docs.sort();
    paths.extend(in_docs);
    paths
        .into_iter()
        .map(|p| {
            let name = p.strip_prefix(&root).unwrap_or(&p).display().to_string();
            let text = std::fs::read_to_string(&p)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
            (name, text)
        })
        .collect()
}

/// The fenced blocks of `text` (```lang … ```).
fn blocks(doc: &str, text: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut open: Option<Block> = None;
    for (i, raw) in text.lines().enumerate() {
        let t = raw.trim();
        match open.take() {
            None => {
                if let Some(lang) = t.strip_prefix("```") {
                    open = Some(Block {
                        doc: doc.to_owned(),
                        line: i + 1,
                        lang: lang.trim().to_owned(),
                        lines: Vec::new(),
                    });
                }
            }
            Some(mut b) => {
                if t == "```" {
                    out.push(b);
                } else {
                    b.lines.push(t.to_owned());
                    open = Some(b);
                }
            }
        }
    }
    assert!(open.is_none(), "{doc}: a ``` block is not closed");
    out
}

/// Every file under examples/ (its path and its lines, trimmed).
fn example_files() -> Vec<(String, Vec<String>)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let root = root();
    let mut paths = Vec::new();
    walk(&root.join("examples"), &mut paths);
    paths.sort();
    paths
        .into_iter()
        .filter_map(|p| {
            let text = std::fs::read_to_string(&p).ok()?;
            let name = p.strip_prefix(&root).unwrap_or(&p).display().to_string();
            Some((name, text.lines().map(|l| l.trim().to_owned()).collect()))
        })
        .collect()
}

/// The example file that holds `snippet` as a contiguous run of lines.
fn source_of<'a>(snippet: &[String], files: &'a [(String, Vec<String>)]) -> Option<&'a str> {
    // Blank lines at the block's ends are layout, not content.
    let start = snippet.iter().position(|l| !l.is_empty())?;
    let end = snippet.iter().rposition(|l| !l.is_empty())? + 1;
    let snippet = &snippet[start..end];
    files
        .iter()
        .find(|(_, lines)| lines.windows(snippet.len()).any(|w| w == snippet))
        .map(|(name, _)| name.as_str())
}

#[test]
fn every_rust_block_in_the_docs_is_an_excerpt_of_an_example() {
    let files = example_files();
    assert!(
        files.iter().any(|(n, _)| n.ends_with(".rs")),
        "no .rs file under examples/"
    );
    let mut checked = 0;
    let mut broken = Vec::new();
    for (doc, text) in docs() {
        for b in blocks(&doc, &text).into_iter().filter(|b| b.lang == "rust") {
            checked += 1;
            if source_of(&b.lines, &files).is_none() {
                let first = b
                    .lines
                    .iter()
                    .find(|l| !l.is_empty())
                    .cloned()
                    .unwrap_or_default();
                broken.push(format!(
                    "{}:{}: the ```rust block starting {first:?} is not a contiguous run of lines of any file under examples/ (copy it from the example it shows, or change the example and the block together)",
                    b.doc, b.line
                ));
            }
        }
    }
    assert!(
        checked > 0,
        "no ```rust block found in README.md or docs/*.md"
    );
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

#[test]
fn custody_dependency_lines_name_only_existing_features() {
    let manifest = std::fs::read_to_string(root().join("crates/custody/Cargo.toml"))
        .unwrap_or_else(|e| panic!("cannot read crates/custody/Cargo.toml: {e}"));
    let manifest: toml::Table =
        toml::from_str(&manifest).unwrap_or_else(|e| panic!("crates/custody/Cargo.toml: {e}"));
    let features: BTreeSet<String> = manifest
        .get("features")
        .and_then(|f| f.as_table())
        .map(|t| t.keys().cloned().collect())
        .unwrap_or_default();
    assert!(
        features.contains("sqlite"),
        "crates/custody/Cargo.toml has no [features] with sqlite"
    );

    let mut checked = 0;
    let mut broken = Vec::new();
    for (doc, text) in docs() {
        for b in blocks(&doc, &text).into_iter().filter(|b| b.lang == "toml") {
            for (i, line) in b.lines.iter().enumerate() {
                let is_custody = line
                    .strip_prefix("custody")
                    .is_some_and(|rest| rest.trim_start().starts_with('='));
                if !is_custody {
                    continue;
                }
                checked += 1;
                let at = format!("{}:{}", b.doc, b.line + 1 + i);
                let dep: toml::Table = match toml::from_str(line) {
                    Ok(t) => t,
                    Err(e) => {
                        broken.push(format!("{at}: {line:?} is not valid TOML: {e}"));
                        continue;
                    }
                };
                let named = dep
                    .get("custody")
                    .and_then(|d| d.get("features"))
                    .and_then(|f| f.as_array())
                    .cloned()
                    .unwrap_or_default();
                for f in named {
                    match f.as_str() {
                        Some(f) if features.contains(f) => {}
                        _ => broken.push(format!(
                            "{at}: feature {f} of custody does not exist; crates/custody/Cargo.toml has {features:?}"
                        )),
                    }
                }
            }
        }
    }
    assert!(
        checked > 0,
        "no `custody = …` dependency line in a ```toml block of the docs"
    );
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

/// The check itself can fail: a snippet with one line changed, or lines
/// taken out of order or with a gap, is not found.
#[test]
fn an_altered_snippet_is_not_taken_for_an_excerpt() {
    let lines = |s: &str| s.lines().map(|l| l.trim().to_owned()).collect::<Vec<_>>();
    let files = vec![(
        "examples/x.rs".to_owned(),
        lines("fn a() {\n    let x = 1;\n    let y = 2;\n}"),
    )];
    assert_eq!(
        source_of(&lines("\n  let x = 1;\nlet y = 2;\n"), &files),
        Some("examples/x.rs")
    );
    assert_eq!(source_of(&lines("let x = 1;\nlet y = 3;"), &files), None);
    assert_eq!(source_of(&lines("let y = 2;\nlet x = 1;"), &files), None);
    assert_eq!(source_of(&lines("fn a() {\nlet y = 2;"), &files), None);
}
