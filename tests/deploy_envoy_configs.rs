//! Every Envoy config users copy from envoy/ is accepted by the real Envoy
//! (`envoy --mode validate`) once its `${...}` placeholders are filled; and validation is
//! not a rubber stamp: a misspelt field in the same file is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use svid_bridge::testing as common;

use std::path::{Path, PathBuf};
use std::process::Command;

/// envoy/*.yaml, sorted.
fn envoy_configs() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(common::manifest_dir().join("envoy"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// `${NAME}` placeholders outside comments, in order of first use.
fn placeholders(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        let mut rest = line;
        while let Some(start) = rest.find("${") {
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .unwrap_or_else(|| panic!("unclosed placeholder in {line:?}"));
            let name = after[..end].to_owned();
            if !names.contains(&name) {
                names.push(name);
            }
            rest = &after[end..];
        }
    }
    names
}

/// A value that fits a placeholder by its name's convention; a new kind of placeholder must
/// get a rule here (and documentation in the file's header).
fn value_for(name: &str) -> String {
    match name {
        "NODE_ID" => "validate-node".into(),
        "SDS_SOCKET" => "./var/run/secrets/workload-spiffe-uds/socket".into(),
        n if n.ends_with("_PORT") => "0".into(),
        n if n.ends_with("_ADDRESS") => "127.0.0.1".into(),
        n if n.ends_with("_SPIFFE_ID") => "spiffe://example.org/ns/default/sa/peer".into(),
        other => panic!("no test value for placeholder ${{{other}}}: add a rule to value_for"),
    }
}

fn fill(text: &str) -> String {
    let mut out = text.to_owned();
    for name in placeholders(text) {
        out = out.replace(&format!("${{{name}}}"), &value_for(&name));
    }
    assert!(
        placeholders(&out).is_empty(),
        "placeholders left after filling"
    );
    out
}

/// `envoy --mode validate -c <config>`: Ok(output) when Envoy accepts it.
fn validate(config: &str, dir: &Path, name: &str) -> Result<String, String> {
    let path = dir.join(name);
    std::fs::write(&path, config).unwrap();
    let out = Command::new(common::peer("envoy"))
        .args(["--mode", "validate", "-l", "warning", "-c"])
        .arg(&path)
        .output()
        .expect("run envoy");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

#[test]
fn every_envoy_config_passes_envoy_validate() {
    let files = envoy_configs();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.contains(&"sidecar.yaml".to_owned())
            && names.contains(&"istio-bootstrap.yaml".to_owned()),
        "{names:?}"
    );
    let dir = common::temp_dir("envoy-validate");
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !placeholders(&text).is_empty(),
            "{name}: expected ${{...}} placeholders"
        );
        let out = validate(&fill(&text), dir.path(), &name)
            .unwrap_or_else(|e| panic!("envoy --mode validate refused {name}:\n{e}"));
        assert!(out.contains("OK"), "{name}: {out}");
    }
}

#[test]
fn envoy_validate_refuses_a_misspelt_field() {
    let dir = common::temp_dir("envoy-validate");
    for file in envoy_configs() {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let text = fill(&std::fs::read_to_string(&file).unwrap());
        assert!(
            text.contains("initial_fetch_timeout: 0s"),
            "{name}: every config waits for its identity"
        );
        let broken = text.replacen("initial_fetch_timeout:", "initial_fetch_timout:", 1);
        let err = validate(&broken, dir.path(), &format!("broken-{name}"))
            .expect_err("a misspelt field must be refused");
        assert!(err.contains("initial_fetch_timout"), "{name}: {err}");
    }
}

/// The Istio-style bootstrap keeps the facts Istio depends on (I1, I3 in docs/behaviours.md).
#[test]
fn istio_bootstrap_has_istios_sds_shape() {
    let text =
        std::fs::read_to_string(common::manifest_dir().join("envoy/istio-bootstrap.yaml")).unwrap();
    let body: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    for needle in [
        "- name: sds-grpc",
        "type: STATIC",
        "pipe: { path: ${SDS_SOCKET} }",
        "http2_protocol_options: {}",
        "- name: default",
        "name: ROOTCA",
        "initial_fetch_timeout: 0s",
        "set_node_on_first_message_only: true",
        "match_subject_alt_names:",
    ] {
        assert!(
            body.contains(needle),
            "istio-bootstrap.yaml lacks {needle:?}"
        );
    }
    assert!(
        text.contains("./var/run/secrets/workload-spiffe-uds/socket"),
        "documents Istio's socket path"
    );
}
