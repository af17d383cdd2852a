//! Load and fault helpers for the `reliability_*` and `security_*` suites: a tiny SDS
//! workload program (this very test binary, re-executed under another name so that the
//! agent's `unix:path` selector tells the copies apart), process resource readings from
//! `/proc`, metrics scraping, batch entry creation, and a keep-alive HTTP/1.1 client.
//!
//! # The workload child
//!
//! Every suite that spawns children declares `#[test] fn sds_child() { common::load::child_main() }`.
//! [`spawn_child`] hard-links the test binary under a name of the caller's choice
//! ([`super::workload_binary`]) and runs `<link> --exact sds_child --nocapture` with
//! [`CHILD_ENV`] set; the test returns at once in a normal run. The child speaks SDS on one
//! socket, as Envoy would (StreamSecrets, ACKing every response), or makes one FetchSecrets,
//! and prints one line per event on stdout (line-buffered into its log file):
//!
//! ```text
//! @@RESP ms=<unix ms> version=<v> <name>=cert@<spiffe id>@<serial hex>@<not after, unix s> <name>=ca@<td>+<td> …
//! @@END ms=<unix ms> code=<grpc code> msg=<message>         (the stream ended)
//! @@RECONNECT ms=<unix ms>                                  (reconnect mode: trying again)
//! @@FETCH ok <name>=… …  |  @@FETCH err code=<grpc code> msg=<message>
//! ```
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    Secret, SpiffeCertValidatorConfig, secret,
};
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use prost::Message;

use super::bridge::{SECRET_TYPE_URL, sds_client};
use super::proc::Proc;
use super::{Spire, workload_binary};

/// Set (to the mode) in a re-executed child.
pub const CHILD_ENV: &str = "SVID_BRIDGE_TEST_SDS_CHILD";
const SOCKET_ENV: &str = "SVID_BRIDGE_TEST_SDS_CHILD_SOCKET";
const NAMES_ENV: &str = "SVID_BRIDGE_TEST_SDS_CHILD_NAMES";
const RECONNECT_ENV: &str = "SVID_BRIDGE_TEST_SDS_CHILD_RECONNECT";
const CLAIM_PID_ENV: &str = "SVID_BRIDGE_TEST_SDS_CHILD_CLAIM_PID";

/// Milliseconds since the Unix epoch (children and parent share the clock).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildMode {
    /// One StreamSecrets stream, every response ACKed and printed.
    Stream,
    /// One FetchSecrets, printed; then the child exits.
    Fetch,
}

/// What a child does.
#[derive(Clone, Debug)]
pub struct ChildSpec {
    pub mode: ChildMode,
    pub socket: PathBuf,
    pub names: Vec<String>,
    /// After the stream ends, open a new one (100 ms apart) and say so.
    pub reconnect: bool,
    /// Claim this PID in the node id and metadata (the bridge must ignore it).
    pub claim_pid: Option<u32>,
}

impl ChildSpec {
    pub fn stream(socket: &Path, names: &[&str]) -> ChildSpec {
        ChildSpec {
            mode: ChildMode::Stream,
            socket: socket.to_path_buf(),
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            reconnect: false,
            claim_pid: None,
        }
    }

    pub fn fetch(socket: &Path, names: &[&str]) -> ChildSpec {
        ChildSpec {
            mode: ChildMode::Fetch,
            ..ChildSpec::stream(socket, names)
        }
    }
}

/// A hard link of this test binary named `name`: one distinct workload (`unix:path`).
pub fn child_binary(name: &str) -> PathBuf {
    workload_binary(name, &std::env::current_exe().expect("test binary"))
}

/// Runs `binary` (from [`child_binary`]) as a workload child; its output goes to
/// `<log_dir>/<log_name>.stdout.log`.
pub fn spawn_child(log_name: &str, binary: &Path, spec: &ChildSpec, log_dir: &Path) -> Proc {
    let mut cmd = Command::new(binary);
    cmd.args(["--exact", "sds_child", "--nocapture", "--test-threads=1"])
        .env(
            CHILD_ENV,
            match spec.mode {
                ChildMode::Stream => "stream",
                ChildMode::Fetch => "fetch",
            },
        )
        .env(SOCKET_ENV, &spec.socket)
        .env(NAMES_ENV, spec.names.join(","))
        .env(RECONNECT_ENV, if spec.reconnect { "1" } else { "0" })
        .env_remove("RUST_LOG");
    if let Some(pid) = spec.claim_pid {
        cmd.env(CLAIM_PID_ENV, pid.to_string());
    }
    Proc::spawn(log_name, cmd, log_dir)
}

/// One line a child printed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChildEvent {
    Resp {
        ms: u64,
        version: String,
        secrets: BTreeMap<String, String>,
    },
    End {
        ms: u64,
        code: i32,
        msg: String,
    },
    Reconnect {
        ms: u64,
    },
    Fetch(Result<BTreeMap<String, String>, (i32, String)>),
}

/// Everything a child printed so far.
pub fn child_events(child: &Proc) -> Vec<ChildEvent> {
    let text = std::fs::read_to_string(child.log_paths().0).unwrap_or_default();
    text.lines().filter_map(parse_event).collect()
}

pub fn responses(child: &Proc) -> Vec<(u64, BTreeMap<String, String>)> {
    child_events(child)
        .into_iter()
        .filter_map(|e| match e {
            ChildEvent::Resp { ms, secrets, .. } => Some((ms, secrets)),
            _ => None,
        })
        .collect()
}

fn field<'a>(token: &'a str, key: &str) -> Option<&'a str> {
    token.strip_prefix(key)?.strip_prefix('=')
}

fn parse_event(line: &str) -> Option<ChildEvent> {
    // libtest prints "test sds_child ... " before the first line.
    let rest = &line[line.find("@@")? + 2..];
    let mut tokens = rest.split(' ');
    let kind = tokens.next()?;
    let secrets_of = |tokens: std::str::Split<'_, char>| {
        tokens
            .filter_map(|t| t.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect::<BTreeMap<_, _>>()
    };
    match kind {
        "RESP" => {
            let ms = field(tokens.next()?, "ms")?.parse().ok()?;
            let version = field(tokens.next()?, "version")?.to_owned();
            Some(ChildEvent::Resp {
                ms,
                version,
                secrets: secrets_of(tokens),
            })
        }
        "END" => {
            let ms = field(tokens.next()?, "ms")?.parse().ok()?;
            let code = field(tokens.next()?, "code")?.parse().ok()?;
            let msg = rest.split_once(" msg=").map_or("", |(_, m)| m).to_owned();
            Some(ChildEvent::End { ms, code, msg })
        }
        "RECONNECT" => Some(ChildEvent::Reconnect {
            ms: field(tokens.next()?, "ms")?.parse().ok()?,
        }),
        "FETCH" => match tokens.next()? {
            "ok" => Some(ChildEvent::Fetch(Ok(secrets_of(tokens)))),
            _ => {
                let code = field(tokens.next()?, "code")?.parse().ok()?;
                let msg = rest.split_once(" msg=").map_or("", |(_, m)| m).to_owned();
                Some(ChildEvent::Fetch(Err((code, msg))))
            }
        },
        _ => None,
    }
}

/// `cert@<spiffe id>@<serial>@<not_after>` or `ca@<td>+<td>` (SPIFFE validator) or `ca@trusted_ca`.
pub fn describe(secret: &Secret) -> String {
    match &secret.r#type {
        Some(secret::Type::TlsCertificate(tls)) => {
            let Some(Specifier::InlineBytes(chain)) = tls
                .certificate_chain
                .as_ref()
                .and_then(|d| d.specifier.as_ref())
            else {
                return "cert@?".into();
            };
            let Some(leaf) = pem::parse_many(chain)
                .ok()
                .and_then(|p| p.into_iter().next())
            else {
                return "cert@?".into();
            };
            let (serial, not_after) = x509_parser::parse_x509_certificate(leaf.contents())
                .map(|(_, c)| {
                    (
                        c.raw_serial_as_string().replace(':', ""),
                        c.validity().not_after.timestamp(),
                    )
                })
                .unwrap_or_default();
            format!(
                "cert@{}@{serial}@{not_after}",
                super::spire::spiffe_id_of_der(leaf.contents())
            )
        }
        Some(secret::Type::ValidationContext(ctx)) => {
            if let Some(typed) = ctx
                .custom_validator_config
                .as_ref()
                .and_then(|c| c.typed_config.as_ref())
            {
                let config =
                    SpiffeCertValidatorConfig::decode(typed.value.as_slice()).unwrap_or_default();
                let tds: Vec<String> = config.trust_domains.into_iter().map(|t| t.name).collect();
                format!("ca@{}", tds.join("+"))
            } else {
                "ca@trusted_ca".into()
            }
        }
        _ => "other".into(),
    }
}

fn describe_response(response: &DiscoveryResponse) -> String {
    response
        .resources
        .iter()
        .map(|any| {
            let secret = Secret::decode(any.value.as_slice()).unwrap_or_default();
            format!("{}={}", secret.name, describe(&secret))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn child_request(names: &[String], claim_pid: Option<u32>) -> DiscoveryRequest {
    let mut node = Node {
        id: "sidecar~child".into(),
        cluster: "child".into(),
        ..Default::default()
    };
    if let Some(pid) = claim_pid {
        // Whatever a client says about itself, the bridge must go by SO_PEERCRED only.
        node.id = format!("sidecar~{pid}~claimed");
        let fields = [(
            "pid".to_owned(),
            Value {
                kind: Some(Kind::NumberValue(f64::from(pid))),
            },
        )];
        node.metadata = Some(Struct {
            fields: fields.into_iter().collect(),
        });
    }
    DiscoveryRequest {
        node: Some(node),
        resource_names: names.to_vec(),
        type_url: SECRET_TYPE_URL.into(),
        ..Default::default()
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The child program; returns at once unless [`CHILD_ENV`] is set.
pub fn child_main() {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return;
    };
    let socket = PathBuf::from(std::env::var(SOCKET_ENV).expect("child socket"));
    let names: Vec<String> = std::env::var(NAMES_ENV)
        .unwrap_or_default()
        .split(',')
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect();
    let reconnect = std::env::var(RECONNECT_ENV).is_ok_and(|v| v == "1");
    let claim_pid = std::env::var(CLAIM_PID_ENV)
        .ok()
        .and_then(|p| p.parse().ok());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        match mode.as_str() {
            "fetch" => {
                let result = sds_client(&socket)
                    .fetch_secrets(child_request(&names, claim_pid))
                    .await;
                match result {
                    Ok(response) => say(&format!(
                        "@@FETCH ok {}",
                        describe_response(response.get_ref())
                    )),
                    Err(status) => say(&format!(
                        "@@FETCH err code={} msg={}",
                        status.code() as i32,
                        status.message().replace('\n', " ")
                    )),
                }
            }
            _ => loop {
                let (code, msg) = stream_once(&socket, &names, claim_pid).await;
                say(&format!(
                    "@@END ms={} code={code} msg={}",
                    unix_ms(),
                    msg.replace('\n', " ")
                ));
                if !reconnect {
                    // Stay alive (as Envoy would), so the parent can tell an ended stream
                    // from an exited process.
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                say(&format!("@@RECONNECT ms={}", unix_ms()));
            },
        }
    });
}

/// One stream until it ends: (gRPC code, message).
async fn stream_once(socket: &Path, names: &[String], claim_pid: Option<u32>) -> (i32, String) {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    if tx.send(child_request(names, claim_pid)).await.is_err() {
        return (-1, "request channel closed".into());
    }
    let mut client = sds_client(socket);
    let mut responses = match client
        .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) => return (status.code() as i32, status.message().to_owned()),
    };
    loop {
        match responses.message().await {
            Ok(Some(response)) => {
                say(&format!(
                    "@@RESP ms={} version={} {}",
                    unix_ms(),
                    response.version_info,
                    describe_response(&response)
                ));
                let ack = DiscoveryRequest {
                    version_info: response.version_info.clone(),
                    response_nonce: response.nonce.clone(),
                    resource_names: names.to_vec(),
                    type_url: SECRET_TYPE_URL.into(),
                    ..Default::default()
                };
                if tx.send(ack).await.is_err() {
                    return (-1, "request channel closed".into());
                }
            }
            Ok(None) => return (0, "stream ended".into()),
            Err(status) => return (status.code() as i32, status.message().to_owned()),
        }
    }
}

// ----------------------------------------------------------------- /proc readings ----

/// What the kernel says about a process's resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcStats {
    pub fds: usize,
    pub rss_kib: u64,
    pub threads: u64,
}

pub fn proc_stats(pid: u32) -> ProcStats {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let value = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    ProcStats {
        fds,
        rss_kib: value("VmRSS:"),
        threads: value("Threads:"),
    }
}

// ------------------------------------------------------------------------- entries ----

/// Creates many `unix:path` entries with one `spire-server entry create -data` call.
pub fn create_entries(spire: &Spire, entries: &[(String, PathBuf, Option<u32>)]) {
    let items: Vec<serde_json::Value> = entries
        .iter()
        .map(|(id, path, ttl)| {
            let mut v = serde_json::json!({
                "spiffe_id": id,
                "parent_id": spire.node_id(),
                "selectors": [{"type": "unix", "value": format!("path:{}", path.display())}],
            });
            if let Some(ttl) = ttl {
                v["x509_svid_ttl"] = serde_json::json!(ttl);
            }
            v
        })
        .collect();
    let file = spire.dir().join(format!("entries-{}.json", unix_ms()));
    std::fs::write(&file, serde_json::json!({ "entries": items }).to_string()).unwrap();
    let out = spire.server_cli(
        &["entry", "create"],
        &["-data", file.to_str().unwrap(), "-output", "json"],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let results = v["results"]
        .as_array()
        .unwrap_or_else(|| panic!("no results: {out}"));
    assert_eq!(results.len(), entries.len(), "{out}");
    for r in results {
        assert_eq!(
            r["status"]["code"].as_i64(),
            Some(0),
            "entry create failed: {r}"
        );
    }
}

/// Percentile (0..=100) of `values` (sorted here), nearest rank.
pub fn percentile(values: &[u64], p: u32) -> u64 {
    if values.is_empty() {
        return 0;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let rank = ((p as usize * v.len()).div_ceil(100)).clamp(1, v.len());
    v[rank - 1]
}

/// A described certificate's parts: (SPIFFE ID, serial, not_after unix seconds).
pub fn cert_parts(desc: &str) -> Option<(String, String, i64)> {
    let mut parts = desc.strip_prefix("cert@")?.split('@');
    let id = parts.next()?.to_owned();
    let serial = parts.next()?.to_owned();
    let not_after = parts.next()?.parse().ok()?;
    Some((id, serial, not_after))
}

/// A log directory kept (and its path printed) when the test fails.
pub struct LogDir(tempfile::TempDir);

impl LogDir {
    pub fn new(prefix: &str) -> LogDir {
        LogDir(super::temp_dir(prefix))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for LogDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.disable_cleanup(true);
            eprintln!("child logs kept in {}", self.0.path().display());
        }
    }
}

/// Waits until `check(i)` holds for every `i < n`; on timeout the message lists the ones
/// that never did.
pub fn wait_for_all<T>(
    timeout: Duration,
    what: &str,
    sources: &[&dyn super::LogSource],
    n: usize,
    mut check: impl FnMut(usize) -> Option<T>,
) -> Vec<T> {
    let start = std::time::Instant::now();
    loop {
        let results: Vec<Option<T>> = (0..n).map(&mut check).collect();
        if results.iter().all(Option::is_some) {
            return results.into_iter().flatten().collect();
        }
        if start.elapsed() >= timeout {
            let missing: Vec<usize> = results
                .iter()
                .enumerate()
                .filter(|(_, r)| r.is_none())
                .map(|(i, _)| i)
                .collect();
            super::proc::fail_with_logs(
                &format!(
                    "timed out after {timeout:?} waiting until {what}; still missing: {missing:?}"
                ),
                sources,
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
