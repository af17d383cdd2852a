//! svid-bridge as Istio uses it, without Istio: real Envoys run envoy/istio-bootstrap.yaml
//! (the `sds-grpc` cluster, `default` and `ROOTCA`, Istio-format SPIFFE IDs) against
//! svid-bridge and real SPIRE. Covers the flags docs/deploying.md tells Istio users to set:
//! federation (`--default-bundle-name null --default-all-bundles-name ROOTCA`, as SPIRE's
//! own Istio recipe, I5 in docs/behaviours.md) and `--extra-trust-anchors` (migration from
//! istiod's CA). Peers outside the mesh's SPIRE (another trust domain's SVID, an istiod-issued
//! certificate) are played by a Python TLS client with a client certificate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use common::http;
use svid_bridge::testing as common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::bridge::{Bridge, spire_options_for_bridge};
use common::{
    EntrySpec, Envoy, EnvoyOptions, LogSource, Spire, SpireOptions, manifest_dir, wait_until_with,
    workload_binary,
};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Istio's identity format (I4 in docs/behaviours.md).
fn istio_id(td: &str, ns: &str, sa: &str) -> String {
    format!("spiffe://{td}/ns/{ns}/sa/{sa}")
}

/// One Envoy running envoy/istio-bootstrap.yaml as the workload `ns/sa`.
struct IstioProxy {
    envoy: Envoy,
    spiffe_id: String,
}

struct ProxySpec<'a> {
    ns: &'a str,
    sa: &'a str,
    sds_socket: &'a Path,
    inbound_allowed: String,
    upstream_port: u16,
    upstream_spiffe_id: String,
    federates_with: Vec<String>,
}

impl<'a> ProxySpec<'a> {
    fn new(ns: &'a str, sa: &'a str, sds_socket: &'a Path) -> Self {
        ProxySpec {
            ns,
            sa,
            sds_socket,
            inbound_allowed: "spiffe://nobody.invalid/ns/none/sa/none".into(),
            upstream_port: 9,
            upstream_spiffe_id: "spiffe://nobody.invalid/ns/none/sa/none".into(),
            federates_with: Vec::new(),
        }
    }

    fn render(&self) -> String {
        let template =
            std::fs::read_to_string(manifest_dir().join("envoy/istio-bootstrap.yaml")).unwrap();
        let values = [
            (
                "NODE_ID",
                format!(
                    "sidecar~127.0.0.1~{}.{}~{}.svc.cluster.local",
                    self.sa, self.ns, self.ns
                ),
            ),
            ("ADMIN_PORT", "0".into()),
            ("SDS_SOCKET", self.sds_socket.display().to_string()),
            ("INBOUND_PORT", "0".into()),
            ("INBOUND_ALLOWED_SPIFFE_ID", self.inbound_allowed.clone()),
            ("OUTBOUND_PORT", "0".into()),
            ("UPSTREAM_ADDRESS", "127.0.0.1".into()),
            ("UPSTREAM_PORT", self.upstream_port.to_string()),
            ("UPSTREAM_SPIFFE_ID", self.upstream_spiffe_id.clone()),
        ];
        let mut config = template;
        for (key, value) in values {
            config = config.replace(&format!("${{{key}}}"), &value);
        }
        assert!(
            !config
                .lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .any(|l| l.contains("${")),
            "unfilled placeholder in istio-bootstrap.yaml"
        );
        config
    }

    /// Registers a private Envoy binary as this workload and starts it; returns once Envoy
    /// is ready, which with `initial_fetch_timeout: 0s` means SDS delivered both secrets.
    fn start(&self, spire: &Spire) -> IstioProxy {
        let binary = workload_binary(
            &format!("envoy-{}-{}", self.ns, self.sa),
            &common::peer("envoy"),
        );
        let spiffe_id = istio_id(spire.trust_domain(), self.ns, self.sa);
        spire.create_entry(&EntrySpec {
            federates_with: self.federates_with.clone(),
            ..EntrySpec::for_path(&spiffe_id, &binary)
        });
        let envoy = Envoy::start_with(
            &self.render(),
            EnvoyOptions {
                binary: Some(binary),
                ..EnvoyOptions::default()
            },
        );
        IstioProxy { envoy, spiffe_id }
    }
}

impl IstioProxy {
    fn port(&self, listener: &str) -> u16 {
        self.envoy
            .listener_port(listener)
            .unwrap_or_else(|| panic!("no {listener} listener"))
    }

    fn outbound(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.port("outbound")).into()
    }

    fn stat(&self, name: &str) -> u64 {
        self.envoy.stat(name).unwrap_or(0)
    }

    /// Trust domains of the CAs Envoy validates peers with (`/certs`), read from each CA's
    /// URI SAN (SPIRE puts `spiffe://<td>` in its CA certificates). Not from the CA's `path`:
    /// Envoy 1.40 labels every SPIFFE-validator CA "<one trust domain>: <inline>", the same
    /// name for all of them.
    fn validator_trust_domains(&self) -> Vec<String> {
        let certs: serde_json::Value =
            serde_json::from_str(&self.envoy.admin_get("/certs")).unwrap();
        let mut tds: Vec<String> = certs["certificates"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|c| c["ca_cert"].as_array().cloned().unwrap_or_default())
            .flat_map(|ca| {
                ca["subject_alt_names"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|san| {
                san["uri"]
                    .as_str()
                    .and_then(|u| u.strip_prefix("spiffe://"))
                    .map(str::to_owned)
            })
            .collect();
        tds.sort();
        tds.dedup();
        tds
    }

    fn assert_secrets_clean(&self) {
        for name in ["default", "ROOTCA"] {
            assert!(
                self.stat(&format!("sds.{name}.update_success")) >= 1,
                "{name} arrived over SDS"
            );
            assert_eq!(
                self.stat(&format!("sds.{name}.update_rejected")),
                0,
                "{name} was never NACKed"
            );
        }
    }
}

impl LogSource for IstioProxy {
    fn log_files(&self) -> Vec<std::sync::Arc<common::proc::LogFiles>> {
        self.envoy.log_files()
    }
}

/// An HTTPS request from outside the mesh's SPIRE: Python's ssl with a client certificate,
/// verifying the server against `ca`. Ok(response text) or Err(what failed).
fn tls_get(port: u16, cert: &Path, key: &Path, ca: &Path) -> Result<String, String> {
    const CLIENT: &str = r#"
import socket, ssl, sys
port, cert, key, ca = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False  # SVIDs name a SPIFFE ID, not a host
ctx.load_verify_locations(ca)
ctx.load_cert_chain(cert, key)
try:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                data += chunk
except (OSError, ssl.SSLError) as e:
    print(f"{type(e).__name__}: {e}")
    sys.exit(1)
if not data:
    print("connection closed without a response")
    sys.exit(1)
sys.stdout.write(data.decode(errors="replace"))
"#;
    let out = Command::new(common::peer("python"))
        .arg("-c")
        .arg(CLIENT)
        .arg(port.to_string())
        .args([cert, key, ca])
        .output()
        .expect("run python");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() && text.starts_with("HTTP/1.1 200") {
        Ok(text)
    } else {
        Err(text)
    }
}

fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    response.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}

/// Two Istio-style sidecars in namespace `shop` do mTLS with each other's Istio-format IDs:
/// the client checks the server with `match_subject_alt_names`, the server admits the client
/// by principal (RBAC), and a third service account of the same namespace is refused.
#[test]
fn istio_style_sidecars_do_mtls_with_istio_format_ids() {
    let spire = Spire::start(spire_options_for_bridge("example.org"));
    let bridge = Bridge::start(&spire);
    let socket = bridge.sds_socket();

    let mut server_spec = ProxySpec::new("shop", "server", &socket);
    server_spec.inbound_allowed = istio_id("example.org", "shop", "client");
    let server = server_spec.start(&spire);

    let mut client_spec = ProxySpec::new("shop", "client", &socket);
    client_spec.upstream_port = server.port("inbound");
    client_spec.upstream_spiffe_id = server.spiffe_id.clone();
    let client = client_spec.start(&spire);

    let response = wait_until_with(
        TIMEOUT,
        "client → server over Istio-style mTLS answers 200",
        &[&bridge, &server, &client],
        || {
            http::get(client.outbound(), "/")
                .ok()
                .filter(|r| r.status == 200)
        },
    );
    assert_eq!(
        response.headers["x-peer-spiffe-id"],
        "spiffe://example.org/ns/shop/sa/client"
    );
    assert_eq!(
        response.headers["x-server-spiffe-id"],
        "spiffe://example.org/ns/shop/sa/server"
    );
    assert_eq!(
        response.headers["x-upstream-verified-spiffe-id"],
        "spiffe://example.org/ns/shop/sa/server"
    );

    let mut intruder_spec = ProxySpec::new("shop", "intruder", &socket);
    intruder_spec.upstream_port = server.port("inbound");
    intruder_spec.upstream_spiffe_id = server.spiffe_id.clone();
    let intruder = intruder_spec.start(&spire);
    let refused = http::get(intruder.outbound(), "/").unwrap();
    assert_ne!(
        refused.status, 200,
        "the server must refuse ns/shop/sa/intruder: {refused:?}"
    );
    assert!(
        server.stat("inbound_authz.rbac.denied") >= 1,
        "refused by the RBAC filter, after a good handshake"
    );

    for proxy in [&server, &client, &intruder] {
        proxy.assert_secrets_clean();
    }
    assert_eq!(
        server.validator_trust_domains(),
        ["example.org"],
        "ROOTCA as the SPIFFE validator"
    );
}

/// Istio federation the SPIRE way: with `--default-bundle-name null
/// --default-all-bundles-name ROOTCA`, ROOTCA carries every trust domain the workload
/// federates with, so a peer holding an SVID of the other trust domain gets in. With the
/// default names ROOTCA is the own domain only and the same peer is refused.
#[test]
fn istio_federation_flags_put_every_trust_domain_in_rootca() {
    let a = Spire::start(spire_options_for_bridge("example.org"));
    let b = Spire::start(SpireOptions {
        start_agent: false,
        ..SpireOptions::trust_domain("other.org")
    });
    a.federate_with(&b);
    let remote_id = istio_id("other.org", "remote", "client");

    let federated = Bridge::start_with(
        &a,
        &[
            "--default-bundle-name=null",
            "--default-all-bundles-name=ROOTCA",
        ],
    );
    let plain = Bridge::start(&a);

    let spec = |ns, socket| {
        let mut s = ProxySpec::new(ns, "server", socket);
        s.inbound_allowed = remote_id.clone();
        s.federates_with = vec!["other.org".into()];
        s
    };
    let fed_socket = federated.sds_socket();
    let plain_socket = plain.sds_socket();
    let fed_server = spec("fed", &fed_socket).start(&a);
    let plain_server = spec("plain", &plain_socket).start(&a);
    fed_server.assert_secrets_clean();
    plain_server.assert_secrets_clean();
    assert_eq!(
        fed_server.validator_trust_domains(),
        ["example.org", "other.org"],
        "ROOTCA carries both trust domains; /certs: {}",
        fed_server.envoy.admin_get("/certs")
    );
    assert_eq!(
        plain_server.validator_trust_domains(),
        ["example.org"],
        "default names: ROOTCA is the own domain"
    );

    // A workload of other.org, with an SVID its own server minted.
    let dir = common::temp_dir("federated-peer");
    b.server_cli(
        &["x509", "mint"],
        &[
            "-spiffeID",
            &remote_id,
            "-write",
            dir.path().to_str().unwrap(),
        ],
    );
    let cert = dir.path().join("svid.pem");
    let key = dir.path().join("key.pem");
    assert!(
        cert.exists() && key.exists(),
        "x509 mint wrote {:?}",
        std::fs::read_dir(dir.path()).unwrap().collect::<Vec<_>>()
    );
    let ca = write(dir.path(), "example.org.pem", &a.bundle_pem());

    let response = wait_until_with(
        TIMEOUT,
        "the other.org peer is admitted by the federated server",
        &[&federated, &fed_server],
        || tls_get(fed_server.port("inbound"), &cert, &key, &ca).ok(),
    );
    assert_eq!(
        header(&response, "x-peer-spiffe-id"),
        Some(remote_id.as_str())
    );
    let refused = tls_get(plain_server.port("inbound"), &cert, &key, &ca)
        .expect_err("own-domain ROOTCA must refuse other.org");
    assert!(!refused.starts_with("HTTP/1.1 200"), "{refused}");
}

/// Migration from istiod's CA (istio/istio#50783): with `--extra-trust-anchors` the old root
/// joins the own trust domain's ROOTCA, so a not-yet-migrated workload whose certificate
/// istiod issued is still admitted by a migrated one.
#[test]
fn extra_trust_anchors_admit_workloads_of_the_old_ca() {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose, SanType,
    };

    let dir = common::temp_dir("istiod-ca");
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "cluster.local");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let anchors = write(dir.path(), "root-cert.pem", &ca_cert.pem());
    let issuer = Issuer::new(ca_params, ca_key);

    let legacy_id = istio_id("example.org", "legacy", "client");
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.subject_alt_names = vec![SanType::URI(legacy_id.as_str().try_into().unwrap())];
    leaf.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    let cert = write(dir.path(), "legacy.pem", &leaf_cert.pem());
    let key = write(dir.path(), "legacy.key", &leaf_key.serialize_pem());

    let spire = Spire::start(spire_options_for_bridge("example.org"));
    let ca = write(dir.path(), "spire.pem", &spire.bundle_pem());
    let migrated = Bridge::start_with(
        &spire,
        &[&format!("--extra-trust-anchors={}", anchors.display())],
    );
    let plain = Bridge::start(&spire);
    let spec = |ns, socket| {
        let mut s = ProxySpec::new(ns, "server", socket);
        s.inbound_allowed = legacy_id.clone();
        s
    };
    let migrated_socket = migrated.sds_socket();
    let plain_socket = plain.sds_socket();
    let migrated_server = spec("migrated", &migrated_socket).start(&spire);
    let plain_server = spec("plain", &plain_socket).start(&spire);
    migrated_server.assert_secrets_clean();

    let response = wait_until_with(
        TIMEOUT,
        "the istiod-issued workload is admitted",
        &[&migrated, &migrated_server],
        || tls_get(migrated_server.port("inbound"), &cert, &key, &ca).ok(),
    );
    assert_eq!(
        header(&response, "x-peer-spiffe-id"),
        Some(legacy_id.as_str())
    );
    tls_get(plain_server.port("inbound"), &cert, &key, &ca)
        .expect_err("without the extra anchor the old CA is unknown");
}

/// `chart-check istio-template`: the injection template rendered with the data Istio's
/// injector gives it, decoded strictly as a Pod fragment.
fn injection(file: &str, template: &str, native: bool, annotations: &str) -> serde_json::Value {
    let mut cmd = Command::new(common::peer("chart-check"));
    cmd.args([
        "istio-template",
        "--template",
        template,
        "--annotations",
        annotations,
    ]);
    if native {
        cmd.arg("--native");
    }
    let out = cmd.arg(manifest_dir().join(file)).output().unwrap();
    assert!(
        out.status.success(),
        "{file} {template}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The injection templates add the read-only csi.spiffe.io volume and mount it where
/// istio-agent looks (I1, I8), on istio-proxy wherever it is: a container, or an init
/// container when Istio injects native sidecars (mesh default or the pod's annotation).
/// The IstioOperator and istiod Helm values files carry the same templates.
#[test]
fn injection_templates_mount_the_socket_in_istio_proxy() {
    let cases = [
        ("spire", false, "{}", "containers"),
        ("spire", true, "{}", "initContainers"),
        (
            "spire",
            true,
            r#"{"sidecar.istio.io/nativeSidecar":"false"}"#,
            "containers",
        ),
        (
            "spire",
            false,
            r#"{"sidecar.istio.io/nativeSidecar":"true"}"#,
            "initContainers",
        ),
        ("spire-gateway", true, "{}", "containers"),
    ];
    for (template, native, annotations, where_proxy) in cases {
        let what = format!("{template} native={native} annotations={annotations}");
        let pod = injection(
            "deploy/istio/istio-operator.yaml",
            template,
            native,
            annotations,
        );
        assert_eq!(
            pod,
            injection(
                "deploy/istio/istiod-values.yaml",
                template,
                native,
                annotations
            ),
            "{what}: files differ"
        );
        let spec = &pod["spec"];
        assert_eq!(
            spec["volumes"],
            serde_json::json!([{"name": "workload-socket", "csi": {"driver": "csi.spiffe.io", "readOnly": true}}]),
            "{what}"
        );
        let proxy = &spec[where_proxy][0];
        assert_eq!(
            proxy["name"], "istio-proxy",
            "{what}: istio-proxy in {where_proxy}"
        );
        assert_eq!(
            proxy["volumeMounts"],
            serde_json::json!([{"name": "workload-socket", "mountPath": "/var/run/secrets/workload-spiffe-uds", "readOnly": true}]),
            "{what}"
        );
        let other = if where_proxy == "containers" {
            "initContainers"
        } else {
            "containers"
        };
        assert!(spec[other].is_null(), "{what}: nothing in {other}");
        assert_eq!(
            pod["metadata"]["labels"]["spiffe.io/spire-managed-identity"], "true",
            "{what}"
        );
    }
}

/// The example manifests in deploy/ are valid Kubernetes objects, strictly decoded.
#[test]
fn deploy_manifests_decode_strictly() {
    let files = [
        "deploy/istio/example-workload.yaml",
        "deploy/spire/clusterspiffeid-istio.yaml",
    ];
    let out = Command::new(common::peer("chart-check"))
        .arg("decode")
        .args(files.iter().map(|f| manifest_dir().join(f)))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let kinds: Vec<&str> = v["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["ServiceAccount", "Deployment", "Service", "ClusterSPIFFEID"]
    );
    let deployment = &v["objects"][1];
    assert_eq!(
        deployment["spec"]["template"]["metadata"]["annotations"]["inject.istio.io/templates"],
        "sidecar,spire"
    );
    let cid = &v["objects"][3];
    assert_eq!(
        cid["spec"]["spiffeIDTemplate"],
        "spiffe://{{ .TrustDomain }}/ns/{{ .PodMeta.Namespace }}/sa/{{ .PodSpec.ServiceAccountName }}"
    );
    assert_eq!(
        cid["spec"]["podSelector"]["matchLabels"]["spiffe.io/spire-managed-identity"],
        "true"
    );
}
