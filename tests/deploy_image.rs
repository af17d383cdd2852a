//! The container image without a container engine: the Dockerfile's build context (its COPY
//! lines, minus .dockerignore) is enough for Cargo to load the package with the committed
//! lock, and the build and entry point are what the chart and `make release-build` assume.
//! `make release-build` runs the build command itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use svid_bridge::testing as common;

use std::path::Path;
use std::process::Command;

fn read(path: &str) -> String {
    std::fs::read_to_string(common::manifest_dir().join(path)).unwrap()
}

/// Instructions of the Dockerfile, with `\` continuations joined and comments dropped.
fn instructions() -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in read("Dockerfile").lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(t);
                if !current.trim().is_empty() {
                    out.push(current.trim().to_owned());
                }
                current.clear();
            }
        }
    }
    out
}

/// Whether .dockerignore keeps `path` (relative to the context) out of the build context, as
/// the builder reads it: a pattern also covers everything under a directory it names, a `!`
/// pattern brings a path back, and the last pattern that matches wins.
fn dockerignore_excludes(ignored: &[String], path: &str) -> bool {
    let mut excluded = false;
    for pattern in ignored {
        let (keep, p) = match pattern.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, pattern.as_str()),
        };
        let p = p.trim_end_matches('/');
        let matches = path == p
            || path.starts_with(&format!("{p}/"))
            // `*` does not cross a `/`: `*.md` is the context's top-level Markdown only.
            || p.strip_prefix('*').is_some_and(|suffix| {
                path.strip_suffix(suffix).is_some_and(|stem| !stem.contains('/'))
            });
        if matches {
            excluded = !keep;
        }
    }
    excluded
}

#[test]
fn dockerignore_reads_directories_exceptions_and_order_as_the_builder_does() {
    let ignored: Vec<String> = ["tests/", "*.md", "!tests/k8s_node.rs"]
        .map(str::to_owned)
        .to_vec();
    assert!(dockerignore_excludes(&ignored, "tests"));
    assert!(dockerignore_excludes(&ignored, "tests/sds_envoy.rs"));
    assert!(!dockerignore_excludes(&ignored, "tests/k8s_node.rs"));
    assert!(dockerignore_excludes(&ignored, "README.md"));
    assert!(!dockerignore_excludes(&ignored, "src/README.md"));
    assert!(!dockerignore_excludes(&ignored, "src/main.rs"));
}

/// Copies `src` into `dst` (recursively), skipping paths .dockerignore excludes.
fn copy_context(src: &Path, dst: &Path, rel: &str, ignored: &[String]) {
    let name = rel.trim_end_matches('/');
    let excluded = dockerignore_excludes(ignored, name);
    if excluded {
        return;
    }
    if src.is_dir() {
        std::fs::create_dir_all(dst).unwrap();
        for entry in std::fs::read_dir(src).unwrap() {
            let entry = entry.unwrap();
            let child = format!("{name}/{}", entry.file_name().to_string_lossy());
            copy_context(&entry.path(), &dst.join(entry.file_name()), &child, ignored);
        }
    } else {
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(src, dst).unwrap();
    }
}

/// The platform `cargo test` builds for, which is the image's platform (a Linux build stage).
fn host_triple() -> String {
    let out = Command::new("rustc").arg("-vV").output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names the host triple")
        .to_owned()
}

/// Lays out the Dockerfile's build context (its COPY sources, minus .dockerignore) in a
/// temporary directory.
fn image_build_context() -> tempfile::TempDir {
    let ignored: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    let copies: Vec<Vec<String>> = instructions()
        .iter()
        .filter(|i| i.starts_with("COPY ") && !i.contains("--from="))
        .map(|i| i.split_whitespace().skip(1).map(str::to_owned).collect())
        .collect();
    assert!(!copies.is_empty(), "no COPY in the build stage");

    let ctx = common::temp_dir("image-context");
    for copy in &copies {
        let (sources, _dest) = copy.split_at(copy.len() - 1);
        for source in sources {
            let rel = source.trim_end_matches('/');
            copy_context(
                &common::manifest_dir().join(rel),
                &ctx.path().join(rel),
                rel,
                &ignored,
            );
        }
    }
    ctx
}

/// Whether Cargo can load the package in `ctx` as the image's `cargo build --release --locked`
/// does, for this platform only. `--filter-platform`: without it Cargo wants every
/// platform's crates (Windows ones too) in the local registry, which only a machine that
/// once ran a plain `cargo fetch` has; the build stage itself only ever needs its own
/// platform's. `--offline`: nothing is resolved anew, so the committed lock must match.
fn cargo_loads_build_context(ctx: &Path) -> Result<(), String> {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--locked", "--offline", "--format-version", "1"])
        .args(["--filter-platform", &host_triple(), "--manifest-path"])
        .arg(ctx.join("Cargo.toml"))
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(format!(
            "cargo metadata: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let has_binary = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "svid-bridge")
        .flat_map(|p| p["targets"].as_array().unwrap())
        .any(|t| t["name"] == "svid-bridge" && t["kind"][0] == "bin");
    if !has_binary {
        return Err("no svid-bridge binary target in the context".to_owned());
    }
    // `cargo metadata` does not check that every declared target's file exists; a build does,
    // before compiling anything. Asking it for a binary that does not exist stops right after
    // the manifest loaded, listing the real ones.
    let probe = Command::new(env!("CARGO"))
        .args(["build", "--release", "--locked", "--offline"])
        .args(["--bin", "no-such-binary", "--manifest-path"])
        .arg(ctx.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", ctx.join("target"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&probe.stderr);
    if stderr.contains("no bin target named `no-such-binary`") && stderr.contains("svid-bridge") {
        Ok(())
    } else {
        Err(format!("cargo build: {stderr}"))
    }
}

#[test]
fn build_context_holds_everything_cargo_needs_with_the_committed_lock() {
    let ctx = image_build_context();
    for proto in ["proto/csi.proto", "proto/pluginregistration.proto"] {
        assert!(
            ctx.path().join(proto).exists(),
            "build.rs compiles {proto}: the Dockerfile must copy it"
        );
    }
    if let Err(e) = cargo_loads_build_context(ctx.path()) {
        panic!("cargo cannot load the image's build context:\n{e}");
    }
}

/// The check above can fail: a context that misses a target's sources (as if the Dockerfile
/// forgot `COPY benches/`) or whose lock no longer matches the manifest is refused.
#[test]
fn build_context_check_refuses_a_missing_target_and_a_stale_lock() {
    let ctx = image_build_context();
    std::fs::remove_dir_all(ctx.path().join("benches")).unwrap();
    let err = cargo_loads_build_context(ctx.path()).unwrap_err();
    assert!(err.contains("benches"), "{err}");

    // The package's own version moves on without the lock following (a release bump
    // committed without `cargo update -w`): Cargo.lock still says the old one.
    let ctx = image_build_context();
    let manifest = ctx.path().join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let bumped = text.replacen("version = \"0.", "version = \"1000.", 1);
    assert_ne!(text, bumped, "Cargo.toml has a 0.x package version");
    std::fs::write(&manifest, bumped).unwrap();
    let err = cargo_loads_build_context(ctx.path()).unwrap_err();
    assert!(err.contains("--locked"), "{err}");
}

#[test]
fn image_builds_like_make_release_build_and_starts_the_bridge() {
    let all = instructions();
    let run = all
        .iter()
        .find(|i| i.starts_with("RUN "))
        .expect("a RUN in the build stage");
    assert!(run.contains("cargo build --release --locked"), "{run}");
    let mk = read("mk/deploy.mk");
    assert!(
        mk.contains("release-build:\n\t$(CARGO) build --release --locked"),
        "make release-build runs the image's build"
    );

    let froms: Vec<&String> = all.iter().filter(|i| i.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "a builder and a runtime stage");
    assert!(
        froms[1].starts_with("FROM gcr.io/distroless/cc-debian12"),
        "{}",
        froms[1]
    );
    assert!(
        froms[0].contains("-bookworm"),
        "builder on the runtime's Debian release (same glibc): {}",
        froms[0]
    );
    // Exec form: the bridge is PID 1 and receives SIGTERM itself. The chart's probes call
    // /svid-bridge, so that is where the binary must be.
    assert!(
        all.contains(&r#"ENTRYPOINT ["/svid-bridge"]"#.to_owned()),
        "{all:?}"
    );
    assert!(all.contains(&r#"CMD ["run"]"#.to_owned()), "{all:?}");
    assert!(
        all.iter()
            .any(|i| i.starts_with("COPY --from=build") && i.ends_with(" /svid-bridge"))
    );
    assert!(
        !all.iter().any(|i| i.starts_with("USER ")),
        "runs as root: mounts and /proc of other processes"
    );
}
