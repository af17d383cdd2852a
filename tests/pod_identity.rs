//! Pod-scoped identity through the CSI volume (#15), with real SPIRE 1.13.3 and the real
//! bridge binary, the test playing the kubelet (pod fields as `podInfoOnMount` passes
//! them, PI-39), each test in a private mount namespace. The bridge runs with
//! `--pod-fields trust-kubelet` here (no API server); tests/k8s_node.rs covers `api`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use svid_bridge::mount_ns_test;
use svid_bridge::testing as common;
use svid_bridge::testing::csi as csi_support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::Spire;
use common::bridge::{Bridge, spire_options_for_bridge};
use common::spire::EntrySpec;
use csi_support::{
    NodeDirs, PodInfo, fetch_default, mounts_at, node_client, pod_mode_request, publish_request,
    unpublish_request,
};
use svid_bridge::proto::csi::NodePublishVolumeRequest;

const WAIT: Duration = Duration::from_secs(60);

fn block<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// A pod: what the kubelet passes for it.
struct Pod {
    namespace: &'static str,
    name: String,
    uid: String,
    service_account: &'static str,
}

impl Pod {
    fn new(namespace: &'static str, name: &str, service_account: &'static str) -> Pod {
        Pod {
            namespace,
            name: name.to_owned(),
            uid: format!("{name}-0d9a4c1e-2b7f-4e55-9f0a"),
            service_account,
        }
    }

    /// NodePublishVolume for this pod's `mode: pod` volume with `attributes`.
    fn publish(
        &self,
        node: &NodeDirs,
        attributes: &[(&str, &str)],
    ) -> (NodePublishVolumeRequest, PathBuf) {
        let target = node.target(&self.uid);
        let pod = PodInfo {
            namespace: self.namespace,
            name: &self.name,
            uid: &self.uid,
            service_account: self.service_account,
        };
        let request = pod_mode_request(&format!("csi-{}", self.uid), &target, &pod, attributes);
        (request, target)
    }
}

/// The bridge with CSI and pod mode on; pod fields trusted as the kubelet passes them.
fn start_bridge(spire: &Spire, node: &NodeDirs, extra: &[&str]) -> Bridge {
    let mut args = node.args();
    args.extend([
        "--disable-kubelet-registration".to_owned(),
        format!("--pod-state-dir={}", state_dir(node).display()),
        "--pod-fields=trust-kubelet".to_owned(),
        "--kubernetes=off".to_owned(),
    ]);
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Bridge::start_with(spire, &args)
}

fn state_dir(node: &NodeDirs) -> PathBuf {
    node.root.join("state")
}

/// SDS `default` through the pod's own socket, retried until the agent has minted the
/// pod's SVID (entries reach the agent within its sync interval, PI-25).
async fn served_id(socket: &Path, bridge: &Bridge) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        match fetch_default(socket).await {
            Ok(description) => return description,
            Err(err) if Instant::now() > deadline => {
                panic!(
                    "no SVID on {}: {err:?}\n{}",
                    socket.display(),
                    bridge.logs()
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn entry(spire: &Spire, path: &str, selectors: &[String]) -> String {
    let spiffe_id = spire.id(path);
    spire.create_entry(&EntrySpec {
        spiffe_id: spiffe_id.clone(),
        selectors: selectors.to_vec(),
        ..EntrySpec::default()
    });
    spiffe_id
}

mount_ns_test! {
    /// #15: a pod-mode volume gets the SVID of the entry its pod's selectors match —
    /// k8s:ns + k8s:sa, or spire-controller-manager's k8s:pod-uid (PI-24) — on its own
    /// socket, with no PID attestation; another pod's volume gets its own; unpublish
    /// removes the mount, the socket, the tmpfs and the record.
    async fn each_pod_volume_serves_its_own_pods_identity() {
        let spire = block(|| Spire::start(spire_options_for_bridge("example.org")));
        let db = Pod::new("apps", "db-0", "db");
        let web = Pod::new("apps", "web-0", "web");
        let db_id = entry(&spire, "ns/apps/sa/db", &["k8s:ns:apps".into(), "k8s:sa:db".into()]);
        let web_id = entry(&spire, "web-by-uid", &[format!("k8s:pod-uid:{}", web.uid)]);
        let node = NodeDirs::new();
        let bridge = block(|| start_bridge(&spire, &node, &[]));
        let mut csi = node_client(&node.csi_socket()).await;

        let (request, db_target) = db.publish(&node, &[]);
        csi.node_publish_volume(request).await.unwrap();
        let (request, web_target) = web.publish(&node, &[]);
        csi.node_publish_volume(request).await.unwrap();
        assert_eq!(mounts_at(&db_target), 1);

        let db_served = served_id(&db_target.join("socket"), &bridge).await;
        assert!(db_served.starts_with(&format!("cert@{db_id}@")), "{db_served}");
        let web_served = served_id(&web_target.join("socket"), &bridge).await;
        assert!(web_served.starts_with(&format!("cert@{web_id}@")), "{web_served}");

        // `svid-bridge inspect` looks at a pod-mode volume through its socket, as the pod's
        // Envoy would.
        let out = std::process::Command::new(common::bridge_binary())
            .args(["inspect", "--sds-socket"])
            .arg(db_target.join("socket"))
            .arg("default")
            .output()
            .unwrap();
        let printed = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && printed.contains(&db_id), "{printed}{}", String::from_utf8_lossy(&out.stderr));

        // A republish (requiresRepublish, a kubelet restart) answers OK and mounts nothing new.
        let (request, _) = db.publish(&node, &[]);
        csi.node_publish_volume(request).await.unwrap();
        assert_eq!(mounts_at(&db_target), 1);

        let volume_dir = state_dir(&node).join(format!("csi-{}", db.uid));
        assert!(volume_dir.join("socket").exists());
        csi.node_unpublish_volume(unpublish_request(&format!("csi-{}", db.uid), &db_target)).await.unwrap();
        assert_eq!(mounts_at(&db_target), 0);
        assert!(!volume_dir.exists(), "the volume's tmpfs directory is removed");
        assert!(!state_dir(&node).join(format!("csi-{}.json", db.uid)).exists(), "and its record");
        // The other pod is untouched.
        let web_served = served_id(&web_target.join("socket"), &bridge).await;
        assert!(web_served.starts_with(&format!("cert@{web_id}@")), "{web_served}");
    }
}

mount_ns_test! {
    /// PI-22/PI-26: an entry that needs a container-level selector cannot match a volume.
    /// A files volume waits a bounded time for its first SVID, then fails with a message
    /// that names the selectors it used (the kubelet shows it on the pod and retries);
    /// nothing is left mounted, and the bridge goes on serving other pods.
    async fn container_scoped_entries_get_a_clear_refusal() {
        let spire = block(|| Spire::start(spire_options_for_bridge("example.org")));
        let envoy = Pod::new("apps", "envoy-0", "envoy");
        entry(&spire, "needs-container", &["k8s:ns:apps".into(), "k8s:sa:envoy".into(), "k8s:container-name:envoy".into()]);
        let ok = Pod::new("apps", "ok-0", "ok");
        let ok_id = entry(&spire, "ok", &["k8s:ns:apps".into(), "k8s:sa:ok".into()]);
        let node = NodeDirs::new();
        let bridge = block(|| start_bridge(&spire, &node, &["--pod-publish-timeout-seconds=5"]));
        let mut csi = node_client(&node.csi_socket()).await;

        let (request, target) = envoy.publish(&node, &[("files", "true")]);
        let err = csi.node_publish_volume(request).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        let message = err.message();
        assert!(message.contains("no registration entry matching the selectors"), "{message}");
        assert!(message.contains("k8s:sa:envoy") && message.contains(&format!("k8s:pod-uid:{}", envoy.uid)), "{message}");
        assert!(message.contains("container-level selectors"), "{message}");
        assert_eq!(mounts_at(&target), 0, "nothing mounted");
        assert!(!state_dir(&node).join(format!("csi-{}", envoy.uid)).exists());

        let (request, ok_target) = ok.publish(&node, &[]);
        csi.node_publish_volume(request).await.unwrap();
        let served = served_id(&ok_target.join("socket"), &bridge).await;
        assert!(served.starts_with(&format!("cert@{ok_id}@")), "{served}");
    }
}

mount_ns_test! {
    /// PI-40: pod fields that cannot be verified are refused (here `--pod-fields api`
    /// without a pod view) with a message that says why; nothing is mounted. Bad attributes
    /// are refused by name. The shared mode is unchanged beside it.
    async fn unverifiable_pods_and_bad_attributes_are_refused() {
        let spire = block(|| Spire::start(spire_options_for_bridge("example.org")));
        block(|| spire.register_test_binary("tester"));
        let node = NodeDirs::new();
        let mut args = node.args();
        args.extend([
            "--disable-kubelet-registration".to_owned(),
            format!("--pod-state-dir={}", state_dir(&node).display()),
            "--pod-fields=api".to_owned(),
            "--kubernetes=off".to_owned(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let _bridge = block(|| Bridge::start_with(&spire, &args));
        let mut csi = node_client(&node.csi_socket()).await;
        let pod = Pod::new("apps", "db-0", "db");
        let (request, target) = pod.publish(&node, &[]);
        let err = csi.node_publish_volume(request).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
        assert!(err.message().contains("cannot verify the pod's fields"), "{}", err.message());
        assert_eq!(mounts_at(&target), 0);

        let (request, target) = pod.publish(&node, &[("file", "true")]);
        let err = csi.node_publish_volume(request).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("\"file\" is not known"), "{}", err.message());
        assert_eq!(mounts_at(&target), 0);

        // The shared socket directory, as before.
        let shared_target = node.target("shared-pod");
        csi.node_publish_volume(publish_request("vol-shared", &shared_target)).await.unwrap();
        assert_eq!(mounts_at(&shared_target), 1);
    }
}

mount_ns_test! {
    /// #15 item 4: SIGKILL with 20 pod-mode volumes published, restart: every volume's
    /// socket answers again at the same path inside the pod (the tmpfs outlived the
    /// process, unlike csi-lib#74), with the same identity, and nothing is mounted twice.
    async fn a_restart_serves_every_pod_volume_again() {
        const PODS: usize = 20;
        let spire = block(|| Spire::start(spire_options_for_bridge("example.org")));
        // A short X.509 TTL: the agent renews within the test, so the files volumes must be
        // rewritten by the restarted bridge.
        let id = spire.id("ns/apps/sa/app");
        spire.create_entry(&EntrySpec {
            spiffe_id: id.clone(),
            selectors: vec!["k8s:ns:apps".into(), "k8s:sa:app".into()],
            x509_svid_ttl: Some(30),
            ..EntrySpec::default()
        });
        let node = NodeDirs::new();
        let mut bridge = block(|| start_bridge(&spire, &node, &[]));
        let mut csi = node_client(&node.csi_socket()).await;
        let mut targets = Vec::new();
        for i in 0..PODS {
            let pod = Pod::new("apps", &format!("app-{i}"), "app");
            // Every other volume also has files.
            let attributes: &[(&str, &str)] = if i % 2 == 0 { &[("files", "true")] } else { &[] };
            let (request, target) = pod.publish(&node, attributes);
            csi.node_publish_volume(request).await.unwrap_or_else(|e| panic!("{e:?}\n{}", bridge.logs()));
            targets.push(target);
        }
        for target in &targets {
            let served = served_id(&target.join("socket"), &bridge).await;
            assert!(served.starts_with(&format!("cert@{id}@")), "{served}");
        }

        block(|| bridge.kill());
        let restarted = Instant::now();
        block(|| bridge.restart());
        for target in &targets {
            let served = served_id(&target.join("socket"), &bridge).await;
            assert!(served.starts_with(&format!("cert@{id}@")), "{served}");
            assert_eq!(mounts_at(target), 1, "nothing mounted twice on {}", target.display());
        }
        let all_back_ms = restarted.elapsed().as_millis();
        let logs = bridge.logs();
        assert!(logs.contains("pod-mode volumes recovered"), "{logs}");
        // Files keep rotating: each files volume gets a new leaf from the restarted bridge.
        let files: Vec<&PathBuf> = targets.iter().step_by(2).collect();
        let leaves: Vec<Vec<u8>> = files.iter().map(|t| std::fs::read(t.join("svid.pem")).unwrap()).collect();
        block(|| common::wait_until(Duration::from_secs(90), "every files volume rewritten after a rotation", || {
            files.iter().zip(&leaves).all(|(t, old)| std::fs::read(t.join("svid.pem")).unwrap() != *old).then_some(())
        }));
        for target in &files {
            assert_eq!(common::spire::leaf_spiffe_id(&target.join("svid.pem")), id);
        }
        // The restarted bridge unpublishes what its predecessor published.
        let mut csi = node_client(&node.csi_socket()).await;
        for (i, target) in targets.iter().enumerate() {
            let volume_id = format!("csi-{}", Pod::new("apps", &format!("app-{i}"), "app").uid);
            csi.node_unpublish_volume(unpublish_request(&volume_id, target)).await.unwrap();
            assert_eq!(mounts_at(target), 0);
        }
        let left: Vec<_> = std::fs::read_dir(state_dir(&node)).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(left.is_empty(), "state left behind: {left:?}");
        eprintln!("FIGURES pod_volumes_restart: volumes={PODS} restart_to_all_sockets_answering_ms={all_back_ms}");
    }
}

/// `spire-agent api ARGS -socketPath SOCKET`: stdout, or the whole output as the error.
fn agent_api(socket: &Path, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(common::peer("spire-agent"))
        .arg("api")
        .args(args)
        .arg("-socketPath")
        .arg(socket)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

fn mode_and_group(path: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).unwrap();
    (meta.mode() & 0o7777, meta.gid())
}

mount_ns_test! {
    /// Clients nobody here wrote, on a pod-mode volume (#15): `spire-agent api fetch x509`,
    /// `fetch jwt` and `validate jwt` on the pod's socket (the SPIFFE Workload API with the
    /// pod's identity), and the volume's files — the SVID for the pod's entry, a key its
    /// fsGroup can read and nobody else (PI-38), and a JWT-SVID per audience that PyJWT
    /// verifies with the keys SPIRE's OIDC Discovery Provider publishes (what Vault's JWT
    /// auth method reads, PI-57/58), for its audience only.
    async fn spiffe_clients_and_a_jwt_verifier_accept_the_pod_socket_and_files() {
        let spire = block(|| Spire::start(spire_options_for_bridge("example.org")));
        let pod = Pod::new("apps", "vault-client-0", "vault-client");
        let id = entry(&spire, "ns/apps/sa/vault-client", &["k8s:ns:apps".into(), "k8s:sa:vault-client".into()]);
        let node = NodeDirs::new();
        let bridge = block(|| start_bridge(&spire, &node, &[]));
        let mut csi = node_client(&node.csi_socket()).await;
        let (mut request, target) = pod.publish(&node, &[("files", "true"), ("jwtAudiences", "vault,db")]);
        if let Some(svid_bridge::proto::csi::volume_capability::AccessType::Mount(mount)) = request
            .volume_capability
            .as_mut()
            .and_then(|c| c.access_type.as_mut())
        {
            mount.volume_mount_group = "4242".into(); // the pod's fsGroup, as the kubelet passes it
        }
        csi.node_publish_volume(request).await.unwrap_or_else(|e| panic!("{e:?}\n{}", bridge.logs()));

        // The files were there when the publish returned (it waits for them).
        assert_eq!(common::spire::leaf_spiffe_id(&target.join("svid.pem")), id);
        assert_eq!(mode_and_group(&target.join("svid_key.pem")), (0o440, 4242));
        assert_eq!(mode_and_group(&target.join("jwt_svid.vault.token")), (0o440, 4242));
        assert_eq!(mode_and_group(&target.join("svid.pem")).0, 0o444);

        let socket = target.join("socket");
        let fetched = block(|| spire.fetch_x509_from(&common::peer("spire-agent"), &socket)).unwrap();
        assert_eq!(fetched.spiffe_ids, vec![id.clone()], "{}", fetched.stdout);
        let jwt = block(|| agent_api(&socket, &["fetch", "jwt", "-audience", "vault"])).unwrap();
        assert!(jwt.contains(&id), "{jwt}");
        let token = std::fs::read_to_string(target.join("jwt_svid.vault.token")).unwrap();
        let valid = block(|| agent_api(&socket, &["validate", "jwt", "-audience", "vault", "-svid", token.trim()])).unwrap();
        assert!(valid.contains("SVID is valid"), "{valid}");
        assert!(valid.contains(&id), "{valid}");
        let wrong = block(|| agent_api(&socket, &["validate", "jwt", "-audience", "db", "-svid", token.trim()]));
        assert!(wrong.is_err(), "a token for vault is not valid for db: {wrong:?}");

        let oidc = block(|| common::oidc::OidcProvider::start(&spire));
        let subject = block(|| oidc.verify(&target.join("jwt_svid.vault.token"), "vault"));
        assert_eq!(subject, Ok(id.clone()));
        let err = block(|| oidc.verify(&target.join("jwt_svid.vault.token"), "db")).unwrap_err();
        assert!(err.contains("InvalidAudienceError"), "{err}");
        assert_eq!(block(|| oidc.verify(&target.join("jwt_svid.db.token"), "db")), Ok(id));
    }
}
