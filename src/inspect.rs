//! `svid-bridge inspect`: ask an SDS server for secrets exactly as Envoy would (one
//! `StreamSecrets` stream per name, node on the first request, ACK) and describe what came
//! back — SPIFFE IDs, trust domains, serials, expiry. Never the key.
//!
//! `inspect --pod NAMESPACE/NAME` and `--pid PID` instead read the running bridge's
//! per-workload report (`/debug/workloads` on its health address) and print what it serves
//! that workload: SVIDs, trust domains, open streams by name, waits, the last NACK.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use crate::identity::describe::{CertFacts, remaining, rfc3339};
use crate::identity::source::unix_channel;
use crate::sds::secrets::SECRET_TYPE_URL;
use crate::sds::workloads::{WorkloadReport, WorkloadsReport};
use crate::telemetry::health::{self, WORKLOADS_PATH};
use envoy_types::pb::envoy::config::core::v3::{DataSource, Node, data_source};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, secret,
};
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use prost::Message;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InspectError {
    #[error("no SDS socket at {0}: is the bridge running, and is this its --sds-socket?")]
    NoSocket(String),
    #[error("cannot reach the SDS server at {socket}: {reason}")]
    Unreachable { socket: String, reason: String },
    #[error("undecodable secret in the response: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error(
        "cannot read the bridge's workload report at {addr}{path}: {reason} (is this the \
         bridge's --health-addr?)"
    )]
    NoReport {
        addr: String,
        path: &'static str,
        reason: String,
    },
    #[error("--pod takes NAMESPACE/NAME, got {0:?}")]
    BadPod(String),
    #[error("{0}")]
    NoSuchWorkload(String),
}

/// What `inspect` found: the description of every name that was served, a line for every
/// name that was not, and how many were not (the command fails when any was not).
#[derive(Debug, Default)]
pub struct Report {
    pub text: String,
    pub not_served: usize,
}

/// Fetches and describes each name (or everything, for no names). A name the server refuses
/// or does not answer does not hide the others: each gets its own line.
pub async fn inspect(
    socket: PathBuf,
    names: &[String],
    timeout: Duration,
) -> Result<Report, InspectError> {
    // tonic's connect error for a missing path is a chain of transport errors; say it plainly.
    if std::fs::symlink_metadata(&socket).is_err() {
        return Err(InspectError::NoSocket(socket.display().to_string()));
    }
    let client = SecretDiscoveryServiceClient::new(unix_channel(socket.clone()));
    let requests: Vec<Vec<String>> = if names.is_empty() {
        vec![Vec::new()]
    } else {
        names.iter().map(|n| vec![n.clone()]).collect()
    };
    let mut report = Report::default();
    for resource_names in requests {
        let label = resource_names
            .first()
            .cloned()
            .unwrap_or_else(|| "(all)".into());
        match fetch_like_envoy(client.clone(), resource_names, timeout).await {
            Ok(response) => {
                for any in &response.resources {
                    let secret = Secret::decode(any.value.as_slice())?;
                    describe(&secret, &response.version_info, &mut report.text);
                }
            }
            Err(FetchError::Rpc(status)) if is_unreachable(&status) => {
                return Err(InspectError::Unreachable {
                    socket: socket.display().to_string(),
                    reason: status.message().to_owned(),
                });
            }
            Err(e) => {
                report.not_served += 1;
                let _ = writeln!(report.text, "{label}  NOT SERVED: {}", e.reason(timeout));
            }
        }
    }
    Ok(report)
}

/// The server could not be reached at all (as opposed to answering with an error about one
/// name): every other name would fail the same way.
fn is_unreachable(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable && std::error::Error::source(status).is_some()
}

enum FetchError {
    Rpc(tonic::Status),
    Timeout,
    Closed,
}

impl FetchError {
    fn reason(&self, timeout: Duration) -> String {
        match self {
            FetchError::Rpc(status) if status.code() == tonic::Code::InvalidArgument => {
                format!("the server refused it: {}", status.message())
            }
            FetchError::Rpc(status) => {
                format!(
                    "the server answered {:?}: {}",
                    status.code(),
                    status.message()
                )
            }
            FetchError::Timeout => format!(
                "no answer within {timeout:?}: the bridge is still waiting for it (its log says \
                 what it waits for)"
            ),
            FetchError::Closed => "the server closed the stream without an answer".into(),
        }
    }
}

async fn fetch_like_envoy(
    mut client: SecretDiscoveryServiceClient<tonic::transport::Channel>,
    resource_names: Vec<String>,
    timeout: Duration,
) -> Result<DiscoveryResponse, FetchError> {
    let first = DiscoveryRequest {
        node: Some(Node {
            id: "svid-bridge-inspect".into(),
            cluster: "svid-bridge-inspect".into(),
            user_agent_name: "svid-bridge-inspect".into(),
            ..Default::default()
        }),
        resource_names: resource_names.clone(),
        type_url: SECRET_TYPE_URL.into(),
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let _ = tx.send(first).await;
    let call = async {
        let mut responses = client
            .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(FetchError::Rpc)?
            .into_inner();
        let response = responses
            .message()
            .await
            .map_err(FetchError::Rpc)?
            .ok_or(FetchError::Closed)?;
        // ACK as Envoy does, then close.
        let _ = tx
            .send(DiscoveryRequest {
                version_info: response.version_info.clone(),
                resource_names,
                type_url: SECRET_TYPE_URL.into(),
                response_nonce: response.nonce.clone(),
                ..Default::default()
            })
            .await;
        Ok(response)
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| FetchError::Timeout)?
}

fn describe(secret: &Secret, version: &str, out: &mut String) {
    match &secret.r#type {
        Some(secret::Type::TlsCertificate(tls)) => {
            let _ = writeln!(out, "{}  (tls_certificate, version {version})", secret.name);
            let chain = inline_pem(tls.certificate_chain.as_ref());
            for (i, cert) in certificates(&chain).iter().enumerate() {
                let role = if i == 0 { "leaf" } else { "intermediate" };
                let _ = writeln!(out, "  {role}: {}", describe_cert(cert));
            }
        }
        Some(secret::Type::ValidationContext(ctx)) => {
            let _ = writeln!(
                out,
                "{}  (validation_context, version {version})",
                secret.name
            );
            for (td, pem) in trust_bundles(ctx) {
                for cert in certificates(&pem) {
                    let _ = writeln!(out, "  trust domain {td}: CA {}", describe_cert(&cert));
                }
            }
        }
        _ => {
            let _ = writeln!(out, "{}  (unexpected secret type)", secret.name);
        }
    }
}

fn trust_bundles(ctx: &CertificateValidationContext) -> Vec<(String, Vec<u8>)> {
    if let Some(config) = ctx
        .custom_validator_config
        .as_ref()
        .and_then(|c| c.typed_config.as_ref())
        && let Ok(config) = SpiffeCertValidatorConfig::decode(config.value.as_slice())
    {
        return config
            .trust_domains
            .into_iter()
            .map(|td| (td.name, inline_pem(td.trust_bundle.as_ref())))
            .collect();
    }
    vec![("(trusted_ca)".into(), inline_pem(ctx.trusted_ca.as_ref()))]
}

fn inline_pem(source: Option<&DataSource>) -> Vec<u8> {
    match source.and_then(|s| s.specifier.as_ref()) {
        Some(data_source::Specifier::InlineBytes(bytes)) => bytes.clone(),
        Some(data_source::Specifier::InlineString(s)) => s.clone().into_bytes(),
        _ => Vec::new(),
    }
}

fn certificates(pem_bytes: &[u8]) -> Vec<Vec<u8>> {
    pem::parse_many(pem_bytes)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| p.into_contents())
        .collect()
}

fn describe_cert(der: &[u8]) -> String {
    let Some(facts) = CertFacts::of_der(der) else {
        return "(unparseable certificate)".into();
    };
    format!(
        "{}  serial {}  expires {} ({})",
        facts.id,
        facts.serial,
        rfc3339(facts.not_after),
        remaining(facts.not_after, crate::clock::unix_now())
    )
}

/// Which workload `inspect --pod/--pid` asks about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkloadFilter {
    Pod { namespace: String, name: String },
    Pid(i32),
}

impl WorkloadFilter {
    /// `NAMESPACE/NAME`, as `kubectl` prints it.
    pub fn pod(value: &str) -> Result<Self, InspectError> {
        match value.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Self::Pod {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(InspectError::BadPod(value.to_owned())),
        }
    }

    fn matches(&self, workload: &WorkloadReport) -> bool {
        match self {
            Self::Pid(pid) => workload.pid == Some(*pid),
            Self::Pod { namespace, name } => workload
                .pod
                .as_ref()
                .is_some_and(|p| &p.namespace == namespace && &p.name == name),
        }
    }
}

/// `inspect --pod/--pid`: reads the report from the bridge's health address (blocking; a
/// local HTTP call) and describes the matching workloads.
pub fn inspect_workload(
    health_addr: &str,
    filter: &WorkloadFilter,
) -> Result<String, InspectError> {
    let no_report = |reason: String| InspectError::NoReport {
        addr: health_addr.to_owned(),
        path: WORKLOADS_PATH,
        reason,
    };
    let body =
        health::get_body(health_addr, WORKLOADS_PATH).map_err(|e| no_report(e.to_string()))?;
    let report: WorkloadsReport = serde_json::from_str(&body)
        .map_err(|e| no_report(format!("not a workload report: {e}")))?;
    describe_matching(&report, filter)
}

fn describe_matching(
    report: &WorkloadsReport,
    filter: &WorkloadFilter,
) -> Result<String, InspectError> {
    let matching: Vec<&WorkloadReport> = report
        .workloads
        .iter()
        .filter(|w| filter.matches(w))
        .collect();
    if matching.is_empty() {
        return Err(InspectError::NoSuchWorkload(not_found(report, filter)));
    }
    let mut out = String::new();
    for workload in matching {
        describe_workload(workload, &mut out);
    }
    Ok(out)
}

fn not_found(report: &WorkloadsReport, filter: &WorkloadFilter) -> String {
    let who = match filter {
        WorkloadFilter::Pid(pid) => format!("PID {pid}"),
        WorkloadFilter::Pod { namespace, name } => format!("pod {namespace}/{name}"),
    };
    let mut text = format!(
        "no SDS stream of {who} is open to the bridge (it serves {} workload(s)); is its \
         Envoy configured with this bridge's socket, and running?",
        report.workloads.len()
    );
    if matches!(filter, WorkloadFilter::Pod { .. }) && !report.pod_view {
        text.push_str(
            " The bridge has no pod view (no Kubernetes API access: see --kubernetes), so \
             it knows workloads by PID only: use --pid.",
        );
    }
    text
}

fn describe_workload(w: &WorkloadReport, out: &mut String) {
    let pid = w.pid.map_or_else(|| "-".to_owned(), |p| p.to_string());
    match &w.pod {
        Some(pod) => {
            let container = pod.container.as_deref().unwrap_or("?");
            let _ = writeln!(
                out,
                "pod {}/{}  container {container}  pid {pid}",
                pod.namespace, pod.name
            );
        }
        None => {
            let _ = writeln!(out, "pid {pid}  (pod unknown)");
        }
    }
    match w.state.as_str() {
        "ready" if w.svids.is_empty() => {
            let _ = writeln!(
                out,
                "  no SVID: the agent issues none to this workload (no entry matches it)"
            );
        }
        "ready" => {}
        "gone" => {
            let _ = writeln!(out, "  the process has exited");
        }
        _ => {
            let _ = writeln!(out, "  no answer from the SPIRE agent yet");
        }
    }
    for svid in &w.svids {
        let _ = writeln!(
            out,
            "  svid {}  serial {}  expires {} ({})",
            svid.spiffe_id, svid.serial, svid.expires, svid.expires_in
        );
    }
    if !w.trust_domains.is_empty() {
        let _ = writeln!(out, "  trust domains: {}", w.trust_domains.join(", "));
    }
    for stream in &w.streams {
        let names = if stream.names.is_empty() {
            "(all)".to_owned()
        } else {
            stream.names.join(", ")
        };
        let _ = writeln!(out, "  stream {}: {names}", stream.api);
        for wait in &stream.waiting {
            let _ = writeln!(
                out,
                "    waiting for {} for {} (since {}): {}",
                wait.name, wait.waited, wait.since, wait.reason
            );
        }
        if let Some(nack) = &stream.last_nack {
            let _ = writeln!(out, "    last NACK: {nack}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> WorkloadsReport {
        use crate::sds::workloads::{PodReport, StreamReport, SvidReport, WaitReport};
        WorkloadsReport {
            pod_view: true,
            pods_on_node: Some(3),
            workloads: vec![WorkloadReport {
                pid: Some(42),
                pod: Some(PodReport {
                    namespace: "apps".into(),
                    name: "envoy-a".into(),
                    container: Some("envoy".into()),
                }),
                state: "ready".into(),
                svids: vec![SvidReport {
                    spiffe_id: "spiffe://example.org/a".into(),
                    trust_domain: "example.org".into(),
                    serial: "c644bce8".into(),
                    expires: "2026-12-06T16:07:09Z".into(),
                    expires_in: "in 23h 59m".into(),
                }],
                trust_domains: vec!["example.org".into()],
                streams: vec![StreamReport {
                    api: "sotw".into(),
                    names: vec!["default".into(), "spiffe://example.org/b".into()],
                    waiting: vec![WaitReport {
                        name: "spiffe://example.org/b".into(),
                        reason: "the workload holds no SVID with this SPIFFE ID".into(),
                        since: "2026-12-05T16:07:09Z".into(),
                        waited: "12s".into(),
                    }],
                    last_nack: Some("bad".into()),
                }],
            }],
        }
    }

    #[test]
    fn a_workload_is_found_by_pod_or_pid_and_described() {
        let by_pod = WorkloadFilter::pod("apps/envoy-a").unwrap_or_else(|e| panic!("{e}"));
        let text = describe_matching(&report(), &by_pod).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            text.starts_with("pod apps/envoy-a  container envoy  pid 42\n"),
            "{text}"
        );
        assert!(text.contains("  svid spiffe://example.org/a  serial c644bce8  expires 2026-12-06T16:07:09Z (in 23h 59m)"), "{text}");
        assert!(
            text.contains("  stream sotw: default, spiffe://example.org/b"),
            "{text}"
        );
        assert!(
            text.contains("    waiting for spiffe://example.org/b for 12s"),
            "{text}"
        );
        assert!(text.contains("    last NACK: bad"), "{text}");
        let by_pid = describe_matching(&report(), &WorkloadFilter::Pid(42));
        assert_eq!(by_pid.ok(), Some(text));
    }

    #[test]
    fn an_unknown_workload_says_why_it_may_be_missing() {
        let mut r = report();
        let err = describe_matching(&r, &WorkloadFilter::Pid(1)).unwrap_err();
        assert!(err.to_string().contains("no SDS stream of PID 1"), "{err}");
        r.pod_view = false;
        let pod = WorkloadFilter::pod("apps/x").unwrap_or_else(|e| panic!("{e}"));
        let err = describe_matching(&r, &pod).unwrap_err().to_string();
        assert!(
            err.contains("no pod view") && err.contains("--pid"),
            "{err}"
        );
        assert!(WorkloadFilter::pod("nonamespace").is_err());
        assert!(WorkloadFilter::pod("a/b/c").is_err());
    }

    #[test]
    fn a_refused_name_says_the_server_refused_it_not_that_it_is_unreachable() {
        let refused = FetchError::Rpc(tonic::Status::invalid_argument("file-cert:/x: not served"));
        let text = refused.reason(Duration::from_secs(1));
        assert!(
            text.starts_with("the server refused it: file-cert:/x"),
            "{text}"
        );
        assert!(!is_unreachable(&tonic::Status::invalid_argument("x")));
        assert!(!is_unreachable(&tonic::Status::unavailable(
            "the agent is down"
        )));
    }
}
