//! The crate's documentation as text, for the tests that check what it says against the
//! code (`tests/docs.rs`) or against a measurement (`tests/upgrade_check.rs`).
//!
//! A claim is found by what it says, wherever it is: README.md, another Markdown file,
//! or the doc comments in src/ (where the rustdoc guides live). So a section can move
//! from the README into a guide and stay checked. A claim found nowhere is not an error
//! (the section may have been cut); the check says so on stderr.

use std::fs;
use std::path::{Path, PathBuf};

/// The repository's root.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// One document: a Markdown file, or the doc comments of one source file.
pub struct Doc {
    /// Relative to the root.
    pub path: PathBuf,
    /// Markdown; for a source file, its doc comments with the `//!` or `///` removed,
    /// and an empty line wherever code interrupts them.
    pub text: String,
}

impl Doc {
    /// The paragraphs (runs of lines between empty lines) that contain `marker`, each as
    /// one line: runs of white space (line breaks among them) become one space, so that a
    /// marker or a code span broken across lines is found whole.
    pub fn paragraphs_with<'a>(&'a self, marker: &'a str) -> impl Iterator<Item = String> + 'a {
        self.text
            .split("\n\n")
            .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(move |p| p.contains(marker))
    }
}

/// Every document that states what the crate does: the Markdown files but the
/// changelog (a record of what was true then), and the doc comments of src/.
pub fn docs() -> Vec<Doc> {
    let mut out = Vec::new();
    for path in files(&["md", "rs"]) {
        let text = fs::read_to_string(root().join(&path)).unwrap_or_default();
        let rel = path.to_string_lossy();
        if rel.ends_with(".md") && path != Path::new("CHANGELOG.md") {
            out.push(Doc { path, text });
        } else if rel.starts_with("src/") && rel.ends_with(".rs") {
            out.push(Doc {
                text: doc_comments(&text),
                path,
            });
        }
    }
    out
}

/// The doc comments of a Rust source, one line each, an empty line for anything else.
fn doc_comments(source: &str) -> String {
    let mut out = String::new();
    for line in source.lines() {
        let line = line.trim_start();
        let doc = line
            .strip_prefix("//!")
            .or_else(|| line.strip_prefix("///"))
            .filter(|_| !line.starts_with("////"));
        if let Some(doc) = doc {
            out.push_str(doc.strip_prefix(' ').unwrap_or(doc));
        }
        out.push('\n');
    }
    out
}

/// The repository's files (relative paths) whose names end in one of `exts`, and the
/// CI script, skipping build output and the fuzzer's uncommitted corpus.
pub fn files(exts: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(dir) = todo.pop() {
        let Ok(entries) = fs::read_dir(root().join(&dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let rel = dir.join(&name);
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let skip = matches!(name.as_str(), "target" | ".git" | "corpus" | "artifacts");
                if !skip {
                    todo.push(rel);
                }
            } else if exts.iter().any(|e| name.ends_with(&format!(".{e}")))
                || rel == Path::new(".ci/run")
            {
                out.push(rel);
            }
        }
    }
    out.sort();
    out
}

/// The code spans (text between backticks) of `text` that are not inside parentheses,
/// in order: a list's items, not what their explanations mention.
pub fn code_spans(text: &str) -> Vec<&str> {
    let mut spans = Vec::new();
    let mut depth = 0usize;
    let mut parts = text.split('`');
    while let Some(prose) = parts.next() {
        for c in prose.chars() {
            match c {
                '(' => depth += 1,
                ')' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        match parts.next() {
            Some(code) if depth == 0 => spans.push(code),
            Some(_) => {}
            None => break,
        }
    }
    spans
}

/// The first run of digits in `s`, as a number (`"all 7 passed"` → 7); digits grouped
/// with spaces are not joined.
pub fn first_number(s: &str) -> Option<usize> {
    let start = s.find(|c: char| c.is_ascii_digit())?;
    let digits: String = s[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// Tells (on stderr) that a claim was not found anywhere, so that a check that checked
/// nothing is visible in `--nocapture` output.
pub fn not_found(what: &str) {
    eprintln!("note: no document states {what}; nothing to check");
}
