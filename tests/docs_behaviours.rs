//! The repository explains itself. Every behaviour id used in the code and docs (B-9, E11,
//! P-8, DI-4 …) has an entry `### <id>` in docs/behaviours.md, and no file points at
//! documents outside the repository (the reference documents these ids were first written
//! down in): a maintainer who clones the repo must find every reason in it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;

/// Where ids and citations are looked for, relative to the crate root.
const ROOTS: &[&str] = &[
    "src",
    "tests",
    "benches",
    "docs",
    "charts",
    "deploy",
    "envoy",
    "demo",
    "fuzz",
    "proto",
    "mk",
    ".ci",
    "README.md",
    "RELIABILITY.md",
    "BENCHMARKS.md",
    "Makefile",
    "Cargo.toml",
    "build.rs",
    "Dockerfile",
    "clippy.toml",
];

/// Build output, and files of hashes where any letter-digit run can occur.
const SKIP_DIRS: &[&str] = &["target", ".git"];
const SKIP_FILES: &[&str] = &["go.sum", "Cargo.lock"];

const BEHAVIOURS: &str = "docs/behaviours.md";
/// This file spells out the patterns it looks for.
const THIS_FILE: &str = "tests/docs_behaviours.rs";

/// Id prefixes written with a dash: the SPIRE agent (A-, B-, C-, D-, E-, F-, H-, W-, DI-),
/// spiffe-csi-driver, the CSI spec and the kubelet (S-, I-, P-, U-, N-, V-, M-, G-, K-,
/// R-), pod-scoped identity (PI-).
const DASHED: &[&str] = &[
    "A", "B", "C", "D", "E", "F", "G", "H", "I", "K", "M", "N", "P", "R", "S", "U", "V", "W", "DI",
    "PI",
];
/// Id prefixes written without a dash: Envoy (E1…E45, E2a) and Istio (I1…I14).
const UNDASHED: &[&str] = &["E", "I"];

/// Files allowed to cite outside documents: none any more. Should one ever have to be listed
/// (while its citations are rewritten), an entry whose file no longer cites anything fails
/// the test, so the list can only shrink.
const STILL_CITING: &[&str] = &[];

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The behaviour ids on one line, in order. An id starts at a word boundary: one or two
/// capitals of a known prefix, a dash or not, one or two digits (Envoy's `E2a` also takes an
/// `a`), then a word boundary. So `HTTP/2`, `P0`, `V3`, `SHA-256`, `X509-SVID` and the curve
/// `P-256` are not ids.
fn ids_in(line: &str) -> Vec<String> {
    let c: Vec<char> = line.chars().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let at_boundary = i == 0 || !is_word(c[i - 1]);
        if !(at_boundary && c[i].is_ascii_uppercase()) {
            i += 1;
            continue;
        }
        let mut j = i;
        while j < c.len() && c[j].is_ascii_uppercase() {
            j += 1;
        }
        let prefix: String = c[i..j].iter().collect();
        let dashed = c.get(j) == Some(&'-');
        let digits_from = if dashed { j + 1 } else { j };
        let mut end = digits_from;
        while end < c.len() && c[end].is_ascii_digit() {
            end += 1;
        }
        let n_digits = end - digits_from;
        if !dashed && c.get(end) == Some(&'a') {
            end += 1;
        }
        let known = if dashed { DASHED } else { UNDASHED };
        if (1..=2).contains(&n_digits)
            && c.get(end).is_none_or(|&ch| !is_word(ch))
            && known.contains(&prefix.as_str())
        {
            found.push(c[i..end].iter().collect());
            i = end;
        } else {
            i = j;
        }
    }
    found
}

/// The ids docs/behaviours.md has an entry for: the first word of each `### ` heading.
fn entries(behaviours: &str) -> BTreeSet<String> {
    behaviours
        .lines()
        .filter_map(|l| l.strip_prefix("### "))
        .filter_map(|h| h.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// `file:line: id` for every id without an entry.
fn missing_entries(files: &[(String, String)], entries: &BTreeSet<String>) -> Vec<String> {
    let mut missing = Vec::new();
    for (path, text) in files {
        for (n, line) in text.lines().enumerate() {
            for id in ids_in(line) {
                if !entries.contains(&id) {
                    missing.push(format!("{path}:{}: {id}", n + 1));
                }
            }
        }
    }
    missing
}

/// Documents outside the repository this line points at. `csi.md` alone is also the name
/// of a benchmark result file, so it counts only as "reference/csi.md", "reference `csi.md`"
/// or when followed by a section sign or an id ("csi.md §6", "csi.md P-9").
fn outside_citations(line: &str) -> Vec<String> {
    const NAMED: &[&str] = &[
        "../shared",
        "/work/shared",
        "shared/reference",
        "shared/DESIGN",
        "shared reference",
        "DESIGN.md",
        "spire-sds.md",
        "envoy-and-istio.md",
        "pod-identity.md",
        "k8s-node.md",
        "rust-stack.md",
    ];
    let mut found: Vec<String> = NAMED
        .iter()
        .filter(|n| line.contains(*n))
        .map(|n| (*n).to_owned())
        .collect();
    for (at, _) in line.match_indices("reference/") {
        let rest = &line[at + "reference/".len()..];
        let name_len = rest
            .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '-' || ch == '_'))
            .unwrap_or(rest.len());
        if name_len > 0 && rest[name_len..].starts_with(".md") {
            found.push(format!("reference/{}.md", &rest[..name_len]));
        }
    }
    for (at, _) in line.match_indices("csi.md") {
        let mut start = at.saturating_sub(12);
        while !line.is_char_boundary(start) {
            start -= 1;
        }
        let before = &line[start..at];
        let after = line[at + "csi.md".len()..].trim_start_matches([' ', '`']);
        let cited = before.contains("reference")
            || after.starts_with('§')
            || ids_in(after)
                .first()
                .is_some_and(|id| after.starts_with(id.as_str()));
        if cited && !found.iter().any(|f| f.ends_with("csi.md")) {
            found.push("csi.md".to_owned());
        }
    }
    found
}

/// Failures: `file:line: what` for citations outside the allow-list, and allow-listed files
/// that no longer cite anything.
fn citation_failures(files: &[(String, String)], allowed: &[&str]) -> Vec<String> {
    let mut failures = Vec::new();
    let mut still_citing = BTreeSet::new();
    for (path, text) in files {
        for (n, line) in text.lines().enumerate() {
            let cited = outside_citations(line);
            if cited.is_empty() {
                continue;
            }
            if allowed.contains(&path.as_str()) {
                still_citing.insert(path.as_str());
            } else {
                failures.push(format!(
                    "{path}:{}: cites {} (point to docs/behaviours.md instead)",
                    n + 1,
                    cited.join(", ")
                ));
            }
        }
    }
    for path in allowed {
        if !still_citing.contains(path) {
            failures.push(format!(
                "{path}: allow-listed but cites nothing outside the repo now: remove it from \
                 STILL_CITING in {THIS_FILE}"
            ));
        }
    }
    failures
}

fn collect(root: &Path, rel: &str, out: &mut Vec<(String, String)>) {
    let path = root.join(rel);
    if path.is_dir() {
        let mut names: Vec<String> = std::fs::read_dir(&path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !SKIP_DIRS.contains(&n.as_str()))
            .collect();
        names.sort();
        for name in names {
            collect(root, &format!("{rel}/{name}"), out);
        }
    } else if path.is_file() {
        let name = rel.rsplit('/').next().unwrap();
        if SKIP_FILES.contains(&name) || rel == THIS_FILE {
            return;
        }
        // Images and other binary files are not text: nothing to read in them.
        if let Ok(text) = std::fs::read_to_string(&path) {
            out.push((rel.to_owned(), text));
        }
    }
}

/// Every scanned file, as (path relative to the crate root, text).
fn repository_files() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for rel in ROOTS {
        collect(root, rel, &mut files);
    }
    assert!(
        files.iter().any(|(p, _)| p == "src/lib.rs") && files.len() > 100,
        "the scan found only {} files: is ROOTS right?",
        files.len()
    );
    files
}

#[test]
fn every_behaviour_id_in_the_repository_has_an_entry() {
    let files = repository_files();
    let behaviours = &files
        .iter()
        .find(|(p, _)| p == BEHAVIOURS)
        .expect("docs/behaviours.md exists")
        .1;
    let entries = entries(behaviours);
    assert!(entries.len() > 100, "only {} entries parsed", entries.len());
    let others: Vec<(String, String)> = files
        .iter()
        .filter(|(p, _)| p != BEHAVIOURS)
        .cloned()
        .collect();
    let missing = missing_entries(&others, &entries);
    assert!(
        missing.is_empty(),
        "ids without an entry `### <id>` in {BEHAVIOURS} (add one: what the other system \
         does, what svid-bridge does, why; or write the reason instead of the id):\n{}",
        missing.join("\n")
    );
}

#[test]
fn nothing_cites_documents_outside_the_repository() {
    let failures = citation_failures(&repository_files(), STILL_CITING);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The checks above fail when they should: run on small in-memory samples.
#[test]
fn the_checks_catch_what_they_are_for() {
    assert_eq!(
        ids_in("B-9/B-10 fixed; E11–E14, P-1…P-9; I-1 is not I1; E2a; DI-4, PI-5."),
        [
            "B-9", "B-10", "E11", "E14", "P-1", "P-9", "I-1", "I1", "E2a", "DI-4", "PI-5"
        ]
    );
    assert!(
        ids_in("HTTP/2, p99 P0 P50, V3, SHA-256, X509-SVID, UTF-8, P-256, E123, Z-1, B-")
            .is_empty()
    );

    let sample = vec![(
        "src/x.rs".to_owned(),
        "// B-9 fixed\n// nothing here\n// E99 is new, B-9 again".to_owned(),
    )];
    let known: BTreeSet<String> = ["B-9".to_owned()].into();
    assert_eq!(missing_entries(&sample, &known), ["src/x.rs:3: E99"]);
    assert_eq!(
        entries("# T\n### B-9\ntext\n### E99 — new\n## B-1\n"),
        BTreeSet::from(["B-9".to_owned(), "E99".to_owned()])
    );

    for cited in [
        "// (spire-sds.md B-9)",
        "see ../shared/DESIGN.md",
        "# envoy-and-istio.md I1",
        "//! ids refer to reference/csi.md.",
        "/// (csi.md §6)",
        "# (csi.md P-9)",
        "/// reference `csi.md`, ids P-…",
        "rust-stack.md §1",
        "shared reference documents",
    ] {
        assert!(!outside_citations(cited).is_empty(), "missed: {cited}");
    }
    for fine in [
        r#"support::write_result(&dir, "csi.md", &md);"#,
        "(`sds.md`, `csi.md`, `*.png`)",
        "(P-9 in docs/behaviours.md)",
        "the shared libraries it links",
        "BENCHMARKS.md §4.3",
    ] {
        assert!(outside_citations(fine).is_empty(), "false alarm: {fine}");
    }

    let files = vec![
        (
            "tests/a.rs".to_owned(),
            "ok\n// spire-sds.md D-9".to_owned(),
        ),
        ("src/listed.rs".to_owned(), "// csi.md §4".to_owned()),
        ("src/clean.rs".to_owned(), "// D-9".to_owned()),
    ];
    let failures = citation_failures(&files, &["src/listed.rs", "src/clean.rs"]);
    assert_eq!(failures.len(), 2, "{failures:?}");
    assert!(failures[0].starts_with("tests/a.rs:2: cites spire-sds.md"));
    assert!(failures[1].starts_with("src/clean.rs: allow-listed but cites nothing"));
}
