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

use crate::identity::source::unix_channel;
use crate::sds::secrets::SECRET_TYPE_URL;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InspectError {
    #[error("cannot reach the SDS server at {socket}: {status}")]
    Rpc {
        socket: String,
        status: tonic::Status,
    },
    #[error(
        "no answer for {name:?} within {timeout:?}: the bridge is still waiting for it (see its logs)"
    )]
    Timeout { name: String, timeout: Duration },
    #[error("the server closed the stream for {0:?} without an answer")]
    Closed(String),
    #[error("undecodable secret in the response: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// Fetches and describes each name (or everything, for no names).
pub async fn inspect(
    socket: PathBuf,
    names: &[String],
    timeout: Duration,
) -> Result<String, InspectError> {
    let client = SecretDiscoveryServiceClient::new(unix_channel(socket.clone()));
    let requests: Vec<Vec<String>> = if names.is_empty() {
        vec![Vec::new()]
    } else {
        names.iter().map(|n| vec![n.clone()]).collect()
    };
    let mut out = String::new();
    for resource_names in requests {
        let label = resource_names
            .first()
            .cloned()
            .unwrap_or_else(|| "(all)".into());
        let response = fetch_like_envoy(client.clone(), resource_names, timeout)
            .await
            .map_err(|e| match e {
                FetchError::Rpc(status) => InspectError::Rpc {
                    socket: socket.display().to_string(),
                    status,
                },
                FetchError::Timeout => InspectError::Timeout {
                    name: label.clone(),
                    timeout,
                },
                FetchError::Closed => InspectError::Closed(label.clone()),
            })?;
        for any in &response.resources {
            let secret = Secret::decode(any.value.as_slice())?;
            describe(&secret, &response.version_info, &mut out);
        }
    }
    Ok(out)
}

enum FetchError {
    Rpc(tonic::Status),
    Timeout,
    Closed,
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
    let remaining = cert.validity().time_to_expiration().map_or_else(
        || "expired".into(),
        |d| format!("in {}s", d.whole_seconds()),
    );
    // Lowercase hex without separators: the form Envoy's /certs shows, so the two compare.
    let serial: String = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{id}  serial {serial}  expires {not_after} ({remaining})")
}
