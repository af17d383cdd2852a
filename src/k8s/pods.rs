//! Which pod a caller runs in, by name: its cgroup gives the pod UID and container ID
//! ([`super::cgroup`]), the pod view of this node ([`super::watch`]) gives the names.
//!
//! A label for operators only (logs, `inspect`): identities come from the SPIRE agent.

use std::borrow::Cow;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::Store;
use serde::Deserialize;

use super::cgroup::{self, PodCgroup};

/// A pod by name, and the container in it when the process runs in one the pod's status
/// lists (a container that has just started may not be listed yet).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub container: Option<String>,
}

impl fmt::Display for PodRef {
    /// `namespace/name`, as `kubectl` takes it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The pods of this node by UID, or nothing when Kubernetes access is off or unavailable.
/// Cheap to clone; every clone reads the same view.
#[derive(Clone, Default)]
pub struct Pods {
    view: Option<Arc<View>>,
}

struct View {
    store: Store<ViewPod>,
    proc_root: PathBuf,
    /// The client the view watches with, and this node's name: for Events.
    client: Option<(kube::Client, String)>,
}

impl fmt::Debug for Pods {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.view {
            Some(view) => write!(f, "Pods({} on this node)", view.store.len()),
            None => f.write_str("Pods(off)"),
        }
    }
}

impl Pods {
    /// No pod view: every lookup is `None`, and costs nothing.
    pub fn off() -> Self {
        Self::default()
    }

    /// Names from `store`, processes read under `proc_root` (`/proc` on a node).
    pub fn from_store(store: Store<ViewPod>, proc_root: impl Into<PathBuf>) -> Self {
        Self {
            view: Some(Arc::new(View {
                store,
                proc_root: proc_root.into(),
                client: None,
            })),
        }
    }

    /// As [`Pods::from_store`], for a view `client` keeps for `node`.
    pub fn watched(
        store: Store<ViewPod>,
        proc_root: impl Into<PathBuf>,
        client: kube::Client,
        node: String,
    ) -> Self {
        Self {
            view: Some(Arc::new(View {
                store,
                proc_root: proc_root.into(),
                client: Some((client, node)),
            })),
        }
    }

    /// The API client and node name, when the view is watched through the API.
    pub fn client(&self) -> Option<(kube::Client, String)> {
        self.view.as_ref()?.client.clone()
    }

    pub fn is_on(&self) -> bool {
        self.view.is_some()
    }

    /// The pod the process `pid` runs in, if the view knows it.
    pub fn of_pid(&self, pid: i32) -> Option<PodRef> {
        let view = self.view.as_ref()?;
        let cgroup = cgroup::pod_of_pid(&view.proc_root, u32::try_from(pid).ok()?)?;
        view.of_cgroup(&cgroup)
    }

    /// The pod `namespace/name`'s UID, if the view holds it.
    pub fn uid_of(&self, namespace: &str, name: &str) -> Option<String> {
        let view = self.view.as_ref()?;
        view.store
            .find(|pod| {
                pod.metadata.namespace.as_deref() == Some(namespace)
                    && pod.metadata.name.as_deref() == Some(name)
            })
            .and_then(|pod| pod.metadata.uid.clone())
    }

    /// The pod with `uid`, if the view holds it (for verifying a pod-mode volume's fields).
    pub fn by_uid(&self, uid: &str) -> Option<Arc<ViewPod>> {
        let view = self.view.as_ref()?;
        view.store
            .find(|pod| pod.metadata.uid.as_deref() == Some(uid))
    }

    /// How many pods the view holds (0 when off).
    pub fn len(&self) -> usize {
        self.view.as_ref().map_or(0, |view| view.store.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl View {
    fn of_cgroup(&self, cgroup: &PodCgroup) -> Option<PodRef> {
        // A linear scan: the store is keyed by name, and a node holds ~100 pods (110 by the
        // kubelet's default limit); this runs once per SDS stream, not per response.
        let pod = self
            .store
            .find(|pod| pod.metadata.uid.as_deref() == Some(cgroup.pod_uid.as_str()))?;
        pod_ref(&pod, cgroup.container_id.as_deref())
    }
}

/// A pod as the view reads it from the API server: its metadata and the names and runtime IDs
/// of its containers, nothing else. The parser skips every other field of a list or watch
/// event without allocating it: the spec, most of the status, the annotations and managed
/// fields, which are most of a pod's size (BENCHMARKS.md §8).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ViewPod {
    #[serde(default, deserialize_with = "view_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<ViewPodSpec>,
    #[serde(default)]
    pub status: Option<ViewPodStatus>,
}

/// The two fields of the spec a pod-mode volume's pod fields are checked against (PI-40).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ViewPodSpec {
    #[serde(default)]
    pub service_account_name: Option<String>,
    #[serde(default)]
    pub node_name: Option<String>,
}

/// The metadata the view keeps: names, UID, resource version (the watch resumes from it),
/// labels and owners (for selectors). Annotations and managed fields, often the larger part
/// of a pod's metadata, are skipped by the parser.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ViewMeta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    resource_version: Option<String>,
    #[serde(default)]
    labels: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    owner_references: Option<Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>>,
}

fn view_meta<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    let meta = ViewMeta::deserialize(deserializer)?;
    Ok(ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        resource_version: meta.resource_version,
        labels: meta.labels,
        owner_references: meta.owner_references,
        ..ObjectMeta::default()
    })
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ViewPodStatus {
    #[serde(default)]
    pub container_statuses: Option<Vec<ViewContainer>>,
    #[serde(default)]
    pub init_container_statuses: Option<Vec<ViewContainer>>,
    #[serde(default)]
    pub ephemeral_container_statuses: Option<Vec<ViewContainer>>,
}

/// A container's name and its runtime ID (`containerd://<id>`), from its status.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ViewContainer {
    pub name: String,
    #[serde(default, rename = "containerID")]
    pub container_id: Option<String>,
}

impl kube::Resource for ViewPod {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind((): &()) -> Cow<'_, str> {
        "Pod".into()
    }

    fn group((): &()) -> Cow<'_, str> {
        "".into()
    }

    fn version((): &()) -> Cow<'_, str> {
        "v1".into()
    }

    fn api_version((): &()) -> Cow<'_, str> {
        "v1".into()
    }

    fn plural((): &()) -> Cow<'_, str> {
        "pods".into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The names of `pod`, and of its container whose runtime ID is `container_id`.
pub fn pod_ref(pod: &ViewPod, container_id: Option<&str>) -> Option<PodRef> {
    Some(PodRef {
        namespace: pod.metadata.namespace.clone()?,
        name: pod.metadata.name.clone()?,
        container: container_id.and_then(|id| container_name(pod, id)),
    })
}

/// Searches app, init and ephemeral containers: an Envoy may run as a native sidecar (an
/// init container that keeps running).
fn container_name(pod: &ViewPod, container_id: &str) -> Option<String> {
    let status = pod.status.as_ref()?;
    status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten())
        .chain(status.ephemeral_container_statuses.iter().flatten())
        .find(|s| runtime_id(s) == Some(container_id))
        .map(|s| s.name.clone())
}

/// `containerd://<id>`, `cri-o://<id>`, `docker://<id>` → `<id>`.
fn runtime_id(status: &ViewContainer) -> Option<&str> {
    let id = status.container_id.as_deref()?;
    Some(id.split_once("://").map_or(id, |(_, id)| id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::reflector::store::Writer;
    use kube::runtime::watcher::Event;

    /// The pod UID and container ID of the recorded fixture (an Envoy on the test node).
    const UID: &str = "9662b00a-3c6e-45e4-9114-16f9cda52e49";
    const CID: &str = "d8488844b7b4eb7714e43922f2a88dfcc39c37e41db8f372417b48f629d67cbe";

    /// A pod as the API server returns it (JSON, trimmed to what matters), bound to
    /// `node`, with its Envoy container running as `containerd://<CID>`.
    fn pod(namespace: &str, name: &str, uid: &str, container_id: &str) -> ViewPod {
        let json = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": name, "namespace": namespace, "uid": uid,
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                "managedFields": [{"manager": "kubectl", "operation": "Update"}],
            },
            "spec": {"nodeName": "sb-node", "containers": [{"name": "envoy", "image": "envoy"}]},
            "status": {
                "phase": "Running",
                "initContainerStatuses": [{
                    "name": "native-sidecar", "image": "i", "imageID": "", "ready": true,
                    "restartCount": 0, "containerID": format!("containerd://{}", "a".repeat(64)),
                }],
                "containerStatuses": [{
                    "name": "envoy", "image": "envoy", "imageID": "", "ready": true,
                    "restartCount": 0, "containerID": format!("containerd://{container_id}"),
                    "state": {"running": {"startedAt": "2026-12-05T20:00:00Z"}},
                }],
            },
        });
        serde_json::from_value(json).unwrap_or_else(|e| panic!("{e}"))
    }

    fn store_of(pods: Vec<ViewPod>) -> Store<ViewPod> {
        let mut writer: Writer<ViewPod> = Writer::default();
        let store = writer.as_reader();
        writer.apply_watcher_event(&Event::Init);
        for pod in pods {
            writer.apply_watcher_event(&Event::InitApply(pod));
        }
        writer.apply_watcher_event(&Event::InitDone);
        store
    }

    /// A fake `/proc` with one process whose cgroup file is the real one recorded on the
    /// test node.
    fn proc_with_fixture(pid: u32) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let proc = dir.path().join(pid.to_string());
        std::fs::create_dir_all(&proc).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(
            proc.join("cgroup"),
            include_str!("fixtures/containerd-cgroupfs-v1-hybrid.cgroup"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        dir
    }

    #[test]
    fn a_pid_maps_to_its_pod_and_container_by_uid_and_container_id() {
        let proc = proc_with_fixture(4242);
        let other = "11111111-2222-3333-4444-555555555555";
        let pods = Pods::from_store(
            store_of(vec![
                pod("apps", "envoy-a", UID, CID),
                pod("apps", "envoy-b", other, &"b".repeat(64)),
            ]),
            proc.path(),
        );
        assert_eq!(
            pods.of_pid(4242),
            Some(PodRef {
                namespace: "apps".into(),
                name: "envoy-a".into(),
                container: Some("envoy".into()),
            })
        );
        assert_eq!(pods.of_pid(4243), None, "no such process");
        assert_eq!(pods.uid_of("apps", "envoy-b").as_deref(), Some(other));
        assert_eq!(pods.len(), 2);
    }

    #[test]
    fn a_pod_the_view_does_not_hold_maps_to_nothing() {
        let proc = proc_with_fixture(7);
        let pods = Pods::from_store(
            store_of(vec![pod(
                "apps",
                "elsewhere",
                "11111111-2222-3333-4444-555555555555",
                CID,
            )]),
            proc.path(),
        );
        assert_eq!(pods.of_pid(7), None);
    }

    #[test]
    fn a_container_not_listed_yet_still_names_the_pod() {
        let proc = proc_with_fixture(7);
        let pods = Pods::from_store(
            store_of(vec![pod("apps", "starting", UID, &"c".repeat(64))]),
            proc.path(),
        );
        let found = pods.of_pid(7).unwrap_or_else(|| panic!("pod found"));
        assert_eq!(found.to_string(), "apps/starting");
        assert_eq!(found.container, None);
    }

    #[test]
    fn native_sidecars_and_other_runtimes_are_found_by_their_ids() {
        let p = pod("apps", "x", UID, CID);
        assert_eq!(
            pod_ref(&p, Some(&"a".repeat(64))).and_then(|r| r.container),
            Some("native-sidecar".into())
        );
        let mut crio = p.clone();
        if let Some(s) = crio
            .status
            .as_mut()
            .and_then(|s| s.container_statuses.as_mut())
        {
            s[0].container_id = Some(format!("cri-o://{CID}"));
        }
        assert_eq!(
            pod_ref(&crio, Some(CID)).and_then(|r| r.container),
            Some("envoy".into())
        );
    }

    #[test]
    fn off_answers_nothing() {
        let pods = Pods::off();
        assert!(!pods.is_on());
        assert_eq!(pods.of_pid(1), None);
        assert!(pods.is_empty());
    }

    #[test]
    fn the_view_parses_only_what_lookups_read() {
        let p = pod("apps", "envoy-a", UID, CID);
        assert!(p.metadata.managed_fields.is_none());
        assert!(p.metadata.annotations.is_none());
        assert_eq!(p.metadata.uid.as_deref(), Some(UID));
        assert_eq!(
            pod_ref(&p, Some(CID)),
            Some(PodRef {
                namespace: "apps".into(),
                name: "envoy-a".into(),
                container: Some("envoy".into()),
            })
        );
    }
}
