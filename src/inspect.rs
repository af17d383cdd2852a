//! `svid-bridge inspect`: ask an SDS server for secrets exactly as Envoy would (one
//! `StreamSecrets` stream per name, node on the first request, ACK) and describe what came
//! back — SPIFFE IDs, trust domains, serials, expiry. Never the key.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{DataSource, Node, data_source};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, secret,
};
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use prost::Message;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
use x509_parser::time::ASN1Time;

use crate::identity::source::unix_channel;
use crate::sds::secrets::SECRET_TYPE_URL;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InspectError {
    #[error("no SDS socket at {0}: is the bridge running, and is this its --sds-socket?")]
    NoSocket(String),
    #[error("cannot reach the SDS server at {socket}: {reason}")]
    Unreachable { socket: String, reason: String },
    #[error("undecodable secret in the response: {0}")]
    Decode(#[from] prost::DecodeError),
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
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return "(unparseable certificate)".into();
    };
    let uris: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| {
                    if let GeneralName::URI(u) = n {
                        Some((*u).to_owned())
                    } else {
                        None
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let id = if uris.is_empty() {
        cert.subject().to_string()
    } else {
        uris.join(",")
    };
    let not_after = cert.validity().not_after;
    let left = not_after.timestamp() - ASN1Time::now().timestamp();
    let remaining = if left < 0 {
        format!("expired {} ago", human_duration(-left))
    } else {
        format!("in {}", human_duration(left))
    };
    format!(
        "{id}  serial {}  expires {} ({remaining})",
        serial_hex(cert.raw_serial()),
        rfc3339(not_after)
    )
}

/// Lowercase hex without separators or leading zero bytes: the form Envoy's `/certs` and
/// `openssl x509 -serial` show, so the two compare. DER pads a serial whose top bit is set
/// with a 0x00 byte (a positive INTEGER); that byte is encoding, not part of the number.
fn serial_hex(raw: &[u8]) -> String {
    let first = raw
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    raw[first..].iter().map(|b| format!("{b:02x}")).collect()
}

/// Certificate times are UTC (RFC 5280 §4.1.2.5), so no offset conversion is needed.
fn rfc3339(t: ASN1Time) -> String {
    let t = t.to_datetime();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// `1d 3h`, `59m 50s`, `42s`: the two largest units, as an operator reads an expiry.
fn human_duration(seconds: i64) -> String {
    let s = seconds.max(0);
    let (d, h, m, sec) = (s / 86_400, s / 3_600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{sec}s"),
        (0, 0, _) => format!("{m}m {sec}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_serial_with_its_top_bit_set_prints_without_the_der_padding_byte() {
        // DER content of the INTEGER 0xc644bce8: a 0x00 byte keeps it positive.
        assert_eq!(serial_hex(&[0x00, 0xc6, 0x44, 0xbc, 0xe8]), "c644bce8");
        assert_eq!(serial_hex(&[0x7f, 0x01]), "7f01");
        assert_eq!(serial_hex(&[0x00]), "00");
    }

    #[test]
    fn durations_read_as_an_operator_would() {
        assert_eq!(human_duration(42), "42s");
        assert_eq!(human_duration(3_590), "59m 50s");
        assert_eq!(human_duration(86_399), "23h 59m");
        assert_eq!(human_duration(2 * 86_400 + 3 * 3_600 + 5), "2d 3h");
    }

    #[test]
    fn dates_are_rfc3339_in_utc() {
        let t = ASN1Time::from_timestamp(1_796_573_229).unwrap_or_else(|_| ASN1Time::now());
        assert_eq!(rfc3339(t), "2026-12-06T16:07:09Z");
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
