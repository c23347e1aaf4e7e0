//! What the documentation says is checked against the code, so that it cannot drift:
//! the list of `Error` variants, the functions kept over the length limit, the number
//! of fault scenarios `upgrade_check` runs, and every file the repository refers to.
//! (The README's Rust examples are compiled as doctests: see the end of src/lib.rs. The
//! measured fd count is checked against a measurement in tests/upgrade_check.rs.)
//!
//! Each check finds its list wherever the docs state it (tests/util/docs.rs), and fails
//! when the list is stale, naming the document; a list that has been cut is not checked.

#[path = "util/docs.rs"]
mod docs;

// `example()`: builds the examples once, returns a binary's path.
#[cfg(target_os = "linux")]
#[allow(dead_code)]
#[path = "util/examples.rs"]
mod examples;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use docs::{code_spans, docs, files, first_number, not_found, root};

/// Where a list of error variants starts: the paragraph's text after it.
const VARIANTS: &str = "Variants to match on";
/// Where the length limit of functions, and the functions allowed over it, are given.
const LONG_FUNCTIONS: &str = "Functions stay under";

/// The variants of `tableflip::Error`, read from src/error.rs.
fn error_variants() -> BTreeSet<String> {
    let source = fs::read_to_string(root().join("src/error.rs")).unwrap();
    let start = source
        .find("pub enum Error {")
        .expect("pub enum Error in src/error.rs");
    let body = &source[start..];
    let body = &body[..body.find("\n}").expect("the end of enum Error")];
    body.lines()
        .filter_map(|l| l.strip_prefix("    "))
        .filter(|l| l.starts_with(|c: char| c.is_ascii_uppercase()))
        .map(|l| {
            l.split(|c: char| !c.is_ascii_alphanumeric())
                .next()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn the_listed_error_variants_are_the_enums() {
    let variants = error_variants();
    assert!(variants.len() > 10, "cannot read enum Error: {variants:?}");
    let mut found = 0;
    for doc in docs() {
        for paragraph in doc.paragraphs_with(VARIANTS) {
            found += 1;
            let list = &paragraph[paragraph.find(VARIANTS).unwrap()..];
            let listed: BTreeSet<String> = code_spans(list)
                .iter()
                .filter_map(|span| {
                    let name: String = span
                        .chars()
                        .take_while(char::is_ascii_alphanumeric)
                        .collect();
                    name.starts_with(|c: char| c.is_ascii_uppercase())
                        .then_some(name)
                })
                .collect();
            let missing: Vec<_> = variants.difference(&listed).collect();
            let unknown: Vec<_> = listed.difference(&variants).collect();
            assert!(
                missing.is_empty() && unknown.is_empty(),
                "{}: the list of Error variants is stale: missing {missing:?}, not variants \
                 {unknown:?}\n{paragraph}",
                doc.path.display()
            );
        }
    }
    if found == 0 {
        not_found("the list of Error variants");
    }
}

/// Functions of src/ as `module::name` with their length in lines, from the `fn` line
/// to the closing brace, by counting braces outside comments, strings and characters.
fn function_lengths() -> Vec<(String, usize)> {
    let mut out = Vec::new();
    for path in files(&["rs"]) {
        let Ok(rel) = path.strip_prefix("src") else {
            continue;
        };
        let module = rel.with_extension("").to_string_lossy().replace('/', "::");
        let module = module.strip_suffix("::mod").unwrap_or(&module).to_string();
        let code = code_only(&fs::read_to_string(root().join(&path)).unwrap());
        let lines: Vec<&str> = code.lines().collect();
        for (first, line) in lines.iter().enumerate() {
            let Some(at) = fn_keyword(line) else { continue };
            let name: String = line[at + 3..]
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name.is_empty() {
                continue; // `fn(` in a type
            }
            if let Some(last) = body_end(&lines, first, at) {
                out.push((format!("{module}::{name}"), last - first + 1));
            }
        }
    }
    out
}

/// Where the keyword `fn` starts in `line`, if it does.
fn fn_keyword(line: &str) -> Option<usize> {
    let bytes = line.as_bytes();
    line.match_indices("fn ")
        .map(|(i, _)| i)
        .find(|&i| i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'))
}

/// The line of the brace that closes the body of the `fn` at `lines[first][at..]`;
/// `None` for a declaration without a body.
fn body_end(lines: &[&str], first: usize, at: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut opened = false;
    for (n, line) in lines.iter().enumerate().skip(first) {
        let line = if n == first { &line[at..] } else { line };
        for c in line.chars() {
            match c {
                '{' => {
                    depth += 1;
                    opened = true;
                }
                '}' => {
                    depth = depth.checked_sub(1)?;
                    if opened && depth == 0 {
                        return Some(n);
                    }
                }
                ';' if !opened => return None,
                _ => {}
            }
        }
    }
    None
}

/// `source` with comments, string and character literals blanked out (line breaks
/// kept), so that the braces left are the code's.
fn code_only(source: &str) -> String {
    let s = source.as_bytes();
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    // Blanks s[i..end], keeping line breaks; returns end.
    let blank = |out: &mut Vec<u8>, from: usize, end: usize| {
        out.extend(
            s[from..end]
                .iter()
                .map(|&b| if b == b'\n' { b'\n' } else { b' ' }),
        );
        end
    };
    while i < s.len() {
        let rest = &s[i..];
        let after_word = i > 0 && (s[i - 1].is_ascii_alphanumeric() || s[i - 1] == b'_');
        if rest.starts_with(b"//") {
            let end = rest
                .iter()
                .position(|&b| b == b'\n')
                .map_or(s.len(), |p| i + p);
            i = blank(&mut out, i, end);
        } else if rest.starts_with(b"/*") {
            let end = find(rest, b"*/").map_or(s.len(), |p| i + p + 2);
            i = blank(&mut out, i, end);
        } else if !after_word && (rest.starts_with(b"r\"") || rest.starts_with(b"r#")) {
            let hashes = rest[1..].iter().take_while(|&&b| b == b'#').count();
            if rest.get(1 + hashes) != Some(&b'"') {
                out.push(s[i]);
                i += 1;
                continue;
            }
            let close: Vec<u8> = std::iter::once(b'"').chain(vec![b'#'; hashes]).collect();
            let body = 2 + hashes;
            let end = find(&rest[body..], &close).map_or(s.len(), |p| i + body + p + close.len());
            i = blank(&mut out, i, end);
        } else if rest[0] == b'"' {
            let mut j = i + 1;
            while j < s.len() && s[j] != b'"' {
                j += if s[j] == b'\\' { 2 } else { 1 };
            }
            i = blank(&mut out, i, (j + 1).min(s.len()));
        } else if rest[0] == b'\'' && char_literal_len(rest).is_some() {
            let len = char_literal_len(rest).unwrap();
            i = blank(&mut out, i, i + len);
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The length of the character literal at the start of `s` (`'{'`, `'\n'`,
/// `'\u{7b}'`), or `None` for a lifetime.
fn char_literal_len(s: &[u8]) -> Option<usize> {
    if s.get(1) == Some(&b'\\') {
        let close = s[2..].iter().take(10).position(|&b| b == b'\'')?;
        return Some(close + 3);
    }
    let c = std::str::from_utf8(&s[1..s.len().min(6)])
        .ok()
        .or_else(|| std::str::from_utf8(&s[1..s.len().min(5)]).ok())
        .or_else(|| std::str::from_utf8(&s[1..s.len().min(4)]).ok())
        .or_else(|| std::str::from_utf8(&s[1..s.len().min(3)]).ok())?
        .chars()
        .next()?;
    (s.get(1 + c.len_utf8()) == Some(&b'\'')).then_some(2 + c.len_utf8())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn the_functions_allowed_over_the_limit_are_the_long_ones() {
    let lengths = function_lengths();
    assert!(
        lengths
            .iter()
            .any(|(name, _)| name.ends_with("child::child_main")),
        "the scan of src/ found no child::child_main: {lengths:?}"
    );
    let mut found = 0;
    for doc in docs() {
        for paragraph in doc.paragraphs_with(LONG_FUNCTIONS) {
            found += 1;
            let claim = &paragraph[paragraph.find(LONG_FUNCTIONS).unwrap()..];
            let limit = first_number(claim).expect("the limit, in lines");
            let listed: BTreeSet<String> = code_spans(claim)
                .into_iter()
                .filter(|span| span.contains("::"))
                .map(str::to_string)
                .collect();
            let long: BTreeSet<String> = lengths
                .iter()
                .filter(|(_, len)| *len >= limit)
                .map(|(name, _)| name.clone())
                .collect();
            let unlisted: Vec<String> = lengths
                .iter()
                .filter(|(name, len)| *len >= limit && !listed.contains(name))
                .map(|(name, len)| format!("{name} ({len} lines)"))
                .collect();
            let short: Vec<_> = listed.difference(&long).collect();
            assert!(
                unlisted.is_empty() && short.is_empty(),
                "{}: the functions of {limit} lines or more are not the ones listed: \
                 not listed {unlisted:?}; listed but shorter (or gone) {short:?}\n{paragraph}",
                doc.path.display()
            );
        }
    }
    if found == 0 {
        not_found("which functions are allowed over the length limit");
    }
}

/// The brace counter itself: braces in strings, characters and comments do not count,
/// lifetimes are not characters, a declaration has no body.
#[test]
fn the_function_scan_counts_code_braces_only() {
    let source = "fn a<'x>(s: &'x str) -> char {\n    let _ = \"{{\";\n    // }\n    let _ = r#\"}\"#;\n    '{'\n}\nfn b();\n/* fn c() { */\n";
    let code = code_only(source);
    let lines: Vec<&str> = code.lines().collect();
    assert_eq!(body_end(&lines, 0, 0), Some(5), "{code}");
    assert_eq!(body_end(&lines, 6, 0), None);
    assert_eq!(fn_keyword(lines[7]), None, "{code}");
}

/// The fault scenarios that `upgrade_check --faults` runs, as it lists them.
#[cfg(target_os = "linux")]
fn fault_scenarios() -> Vec<String> {
    let out = std::process::Command::new(examples::example("upgrade_check"))
        .arg("--list-faults")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run upgrade_check --list-faults");
    assert!(out.status.success(), "upgrade_check --list-faults: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Every table of fault scenarios has one row per scenario, and every "all N passed"
/// counts them all.
#[cfg(target_os = "linux")]
#[test]
fn the_fault_scenarios_are_counted_right() {
    let scenarios = fault_scenarios();
    assert!(scenarios.len() >= 5, "{scenarios:?}");
    let mut found = 0;
    for doc in docs() {
        let lines: Vec<&str> = doc.text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let header = lines.get(i + 1).is_some_and(|l| l.starts_with("|---"));
            if line.starts_with("| fault") && header {
                found += 1;
                let rows = lines[i + 2..]
                    .iter()
                    .take_while(|l| l.starts_with('|'))
                    .count();
                assert_eq!(
                    rows,
                    scenarios.len(),
                    "{}:{}: the table of fault scenarios has {rows} rows; upgrade_check runs \
                     {}: {scenarios:#?}",
                    doc.path.display(),
                    i + 1,
                    scenarios.len()
                );
            }
        }
        for (at, _) in doc.text.match_indices("all ") {
            let rest = &doc.text[at + 4..];
            let Some(n) = rest.split(' ').next().and_then(|w| w.parse::<usize>().ok()) else {
                continue;
            };
            if rest
                .split(' ')
                .nth(1)
                .is_some_and(|w| w.starts_with("passed"))
            {
                found += 1;
                assert_eq!(
                    n,
                    scenarios.len(),
                    "{}: \"all {n} passed\", but upgrade_check runs {} fault scenarios",
                    doc.path.display(),
                    scenarios.len()
                );
            }
        }
    }
    if found == 0 {
        not_found("how many fault scenarios upgrade_check runs");
    }
}

/// Every file or directory of this repository that a document or a source file names
/// exists: Markdown links, paths under its top directories, and Markdown files named
/// alone.
#[test]
fn every_file_referred_to_exists() {
    let tops = [
        "src",
        "tests",
        "examples",
        "benches",
        "fuzz",
        ".ci",
        "docs",
        "tokio-example",
    ];
    let mut missing = Vec::new();
    let mut checked = 0;
    for path in files(&["rs", "md", "toml"]) {
        let text = fs::read_to_string(root().join(&path)).unwrap_or_default();
        let dir = path.parent().unwrap_or(Path::new(""));
        let markdown = path.extension().is_some_and(|e| e == "md");
        let exists = |rel: &Path| {
            let p = root().join(rel);
            p.exists() || p.with_extension("rs").exists()
        };
        // In a package's files (tokio-example/), a path may be the package's.
        let package = dir
            .ancestors()
            .find(|d| root().join(d).join("Cargo.toml").is_file())
            .unwrap_or(Path::new(""));
        // Markdown links: [text](target). In Rust doc comments only those that look like
        // a path; the others are intra-doc links (`[x](Type::method)`).
        for (at, _) in text.match_indices("](") {
            let target = text[at + 2..].split([')', ' ', '\n']).next().unwrap_or("");
            let target = target.split('#').next().unwrap_or("");
            let external = target.contains("://") || target.starts_with("mailto:");
            let path_like = target.contains('/') || target.contains(".md") || markdown;
            if target.is_empty() || external || !path_like || target.contains("::") {
                continue;
            }
            checked += 1;
            if !exists(&dir.join(target)) {
                missing.push(format!("{}: link to {target}", path.display()));
            }
        }
        for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || "._-/".contains(c))) {
            let word = word.trim_end_matches(['.', '-']);
            let top = word.split('/').next().unwrap_or("");
            let repo_path = word.contains('/') && tops.contains(&top);
            let md_file = word.len() > 3
                && word.ends_with(".md")
                && word.starts_with(|c: char| c.is_ascii_alphanumeric())
                && !word.contains('/');
            if !(repo_path || md_file) {
                continue;
            }
            checked += 1;
            let found = exists(Path::new(word))
                || exists(&package.join(word))
                || (md_file && exists(&dir.join(word)));
            if !found {
                missing.push(format!("{}: {word}", path.display()));
            }
        }
    }
    assert!(
        checked > 20,
        "only {checked} references found: is the scan broken?"
    );
    missing.sort();
    missing.dedup();
    assert!(
        missing.is_empty(),
        "files referred to that the repository does not have:\n{}",
        missing.join("\n")
    );
}
