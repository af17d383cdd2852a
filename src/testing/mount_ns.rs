//! Running a test (or a benchmark) in a private mount namespace, so that its mounts live and
//! die with it and never reach the host. unshare(CLONE_NEWNS) is refused to a multi-threaded
//! process such as the test harness, so the binary re-executes itself under
//! `unshare --mount --propagation private` (util-linux; root).

use std::process::Command;

/// Set for the re-executed binary running inside the namespace.
pub const MOUNT_NS_ENV: &str = "SVID_BRIDGE_TEST_IN_PRIVATE_MOUNT_NS";

pub fn in_private_mount_ns() -> bool {
    std::env::var_os(MOUNT_NS_ENV).is_some()
}

/// Re-runs this test binary's test `name` in a private mount namespace and asserts that it
/// ran and passed; its `FIGURES` lines (measurements a test reports) are echoed to stderr.
pub fn run_in_private_mount_ns(name: &str) {
    let exe = std::env::current_exe().expect("test binary path");
    let output = Command::new("unshare")
        .args(["--mount", "--propagation", "private"])
        .arg(exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(MOUNT_NS_ENV, "1")
        .output()
        .expect("util-linux unshare must be installed");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    for line in stdout
        .lines()
        .chain(stderr.lines())
        .filter(|l| l.contains("FIGURES"))
    {
        eprintln!("{}", &line[line.find("FIGURES").unwrap_or(0)..]);
    }
    assert!(
        output.status.success()
            && stdout.contains(&format!("test {name} ... ok"))
            && stdout.contains("1 passed"),
        "{name} in a private mount namespace: {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
}

/// For a benchmark binary: runs this very binary again, with its arguments, in a private
/// mount namespace, and returns its exit status.
pub fn reexec_in_private_mount_ns() -> std::process::ExitCode {
    let status = Command::new("unshare")
        .args(["--mount", "--propagation", "private"])
        .arg(std::env::current_exe().expect("own binary path"))
        .args(std::env::args_os().skip(1))
        .env(MOUNT_NS_ENV, "1")
        .status()
        .expect("util-linux unshare (and root) are needed");
    if status.success() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

/// A test whose body runs in a private mount namespace: `NAME::in_private_mount_namespace`
/// re-executes the binary to run `NAME::inner` there; `inner` returns at once elsewhere.
#[macro_export]
macro_rules! mount_ns_test {
    ($(#[doc = $doc:expr])* async fn $name:ident() $body:block) => {
        $(#[doc = $doc])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[test]
            fn in_private_mount_namespace() {
                $crate::testing::mount_ns::run_in_private_mount_ns(concat!(
                    stringify!($name),
                    "::inner"
                ));
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn inner() {
                if !$crate::testing::mount_ns::in_private_mount_ns() {
                    return; // only meaningful when run by in_private_mount_namespace
                }
                $body
            }
        }
    };
}
