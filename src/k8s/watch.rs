//! The pod view of this node: one watch on the API server for the pods bound to this node
//! (field selector `spec.nodeName`), kept in a reflector store, re-listed with backoff
//! whenever the watch breaks.
//!
//! Optional by design (`--kubernetes auto|off`): without the API the bridge serves exactly
//! as before, and logs name PIDs only.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use kube::runtime::reflector;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as watch_pods};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use super::pods::{Pods, ViewPod};
use super::{K8sError, KubernetesMode};

/// Where the kubelet mounts a pod's service account token.
pub const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// What starting the pod view needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodViewConfig {
    pub mode: KubernetesMode,
    /// This node's name (`--node-id`, or the variable `--node-id-env` names).
    pub node_name: Option<String>,
    /// After how long a waiting stream's pod gets an Event; `None`: never.
    pub wait_event_after: Option<std::time::Duration>,
}

/// Whether this process runs in a pod with API access: the variables the kubelet sets in
/// every container and the token it mounts (unless the pod opted out).
pub fn in_cluster(env: impl Fn(&str) -> Option<String>, token: &Path) -> bool {
    env("KUBERNETES_SERVICE_HOST").is_some_and(|h| !h.is_empty()) && token.exists()
}

/// Starts the pod view if `config` and the environment allow, else says once why not (INFO:
/// running outside Kubernetes is a supported way to run). Never fails the bridge.
pub fn start(config: &PodViewConfig, proc_root: &Path, shutdown: &CancellationToken) -> Pods {
    if config.mode == KubernetesMode::Off {
        tracing::debug!("Kubernetes API access is off (--kubernetes off)");
        return Pods::off();
    }
    let env = |name: &str| std::env::var(name).ok();
    if !in_cluster(env, Path::new(SERVICE_ACCOUNT_TOKEN)) {
        tracing::info!(
            "no in-cluster Kubernetes configuration (KUBERNETES_SERVICE_HOST and a service \
             account token): logs and inspect name PIDs, not pods"
        );
        return Pods::off();
    }
    let Some(node) = config.node_name.clone().filter(|n| !n.is_empty()) else {
        tracing::info!(
            "no node name (--node-id or the variable --node-id-env names): logs and inspect \
             name PIDs, not pods"
        );
        return Pods::off();
    };
    match client() {
        Ok(client) => spawn(client, node, proc_root.to_path_buf(), shutdown.clone()),
        Err(err) => {
            tracing::warn!(%err, "cannot use the Kubernetes API: logs and inspect name PIDs, not pods");
            Pods::off()
        }
    }
}

fn client() -> Result<Client, K8sError> {
    let config = kube::Config::incluster()?;
    Ok(Client::try_from(config)?)
}

/// Watches `node`'s pods with `client` into a store until `shutdown`.
pub fn spawn(
    client: Client,
    node: String,
    proc_root: PathBuf,
    shutdown: CancellationToken,
) -> Pods {
    let (store, writer) = reflector::store::<ViewPod>();
    let pods = Pods::watched(store, proc_root, client.clone(), node.clone());
    let api: Api<ViewPod> = Api::all(client);
    let selector = format!("spec.nodeName={node}");
    let config = watcher::Config::default().fields(&selector);
    // The default backoff (800 ms doubling to 30 s, jittered, reset after 120 s of health)
    // keeps a broken API server from being hammered by every node at once.
    let events = watch_pods(api, config).default_backoff().reflect(writer);
    tokio::spawn(async move {
        tokio::select! {
            () = follow(events, &node) => {}
            () = shutdown.cancelled() => {}
        }
    });
    pods
}

/// Drives the watch and logs its state changes once each: synced, failing, recovered.
///
/// After a failure kube's watcher resumes the watch from the last resource version it saw
/// (it re-lists only when the server answers 410 Gone), and a resumed watch says nothing
/// until a pod of the node changes: recovery is logged at the first event after the
/// failure, a re-list's end or a pod's change, whichever comes first.
async fn follow<S>(events: S, node: &str)
where
    S: futures::Stream<Item = Result<Event<ViewPod>, watcher::Error>>,
{
    let mut events = std::pin::pin!(events);
    let mut listed = 0usize;
    let mut synced_once = false;
    let mut failing = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => listed = 0,
            Ok(Event::InitApply(_)) => listed += 1,
            Ok(Event::InitDone) => {
                if !synced_once {
                    tracing::info!(node, pods = listed, "watching this node's pods");
                    synced_once = true;
                } else if failing {
                    tracing::info!(node, pods = listed, "the pod watch recovered (re-listed)");
                }
                failing = false;
            }
            Ok(Event::Apply(_) | Event::Delete(_)) => {
                if failing {
                    tracing::info!(node, "the pod watch recovered (resumed)");
                    failing = false;
                }
            }
            Err(err) if !failing => {
                failing = true;
                tracing::warn!(node, %err, "the pod watch failed; retrying with backoff (pod names may be stale or missing meanwhile)");
            }
            Err(err) => tracing::debug!(%err, "the pod watch still fails"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_cluster_needs_both_the_variable_and_the_token() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let token = dir.path().join("token");
        let with_host =
            |name: &str| (name == "KUBERNETES_SERVICE_HOST").then(|| "10.96.0.1".into());
        assert!(!in_cluster(with_host, &token), "no token file");
        std::fs::write(&token, "t").unwrap_or_else(|e| panic!("{e}"));
        assert!(in_cluster(with_host, &token));
        assert!(!in_cluster(|_| None, &token), "no variable");
        assert!(
            !in_cluster(|_| Some(String::new()), &token),
            "empty variable"
        );
    }

    /// Lines logged while `f` runs, through a subscriber of this thread only.
    async fn logged<F: std::future::Future<Output = ()>>(f: F) -> String {
        #[derive(Clone, Default)]
        struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Captured {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        f.await;
        let bytes = captured
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn pod(name: &str) -> ViewPod {
        let mut pod = ViewPod::default();
        pod.metadata.name = Some(name.into());
        pod
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_resumed_watch_says_it_recovered_at_its_first_event() {
        // What kube's watcher yields when the API server goes away and comes back: the
        // watch resumes from its resource version (no re-list) and is silent until a change.
        let events = futures::stream::iter(vec![
            Ok(Event::Init),
            Ok(Event::InitApply(pod("a"))),
            Ok(Event::InitDone),
            Err(watcher::Error::NoResourceVersion),
            Err(watcher::Error::NoResourceVersion),
            Ok(Event::Apply(pod("b"))),
            Err(watcher::Error::NoResourceVersion),
            Ok(Event::Init),
            Ok(Event::InitDone),
        ]);
        let text = logged(follow(events, "sb-node")).await;
        let lines: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split_once("svid_bridge::k8s::watch: "))
            .map(|(_, msg)| msg)
            .collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(lines[0].starts_with("watching this node's pods node=\"sb-node\" pods=1"));
        assert!(lines[1].starts_with("the pod watch failed"), "{text}");
        assert!(
            lines[2].starts_with("the pod watch recovered (resumed)"),
            "{text}"
        );
        assert!(lines[3].starts_with("the pod watch failed"), "{text}");
        assert!(
            lines[4].starts_with("the pod watch recovered (re-listed)"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn off_never_touches_the_environment() {
        let pods = start(
            &PodViewConfig {
                mode: KubernetesMode::Off,
                node_name: Some("n".into()),
                wait_event_after: None,
            },
            Path::new("/proc"),
            &CancellationToken::new(),
        );
        assert!(!pods.is_on());
    }
}
