//! Who the pod is, for sure: the kubelet's pod fields checked against the API server's pod
//! on this node (PI-40: a pod author can write those keys when the CSIDriver object lacks
//! `podInfoOnMount`), and the selectors SPIRE's k8s workload attestor would emit for it
//! at pod level (PI-21, PI-26).

use std::time::Duration;

use super::attributes::PodFields;
use crate::identity::{Selector, SelectorSet};
use crate::k8s::Pods;
use crate::k8s::pods::ViewPod;

/// `--pod-fields`: how a pod-mode volume's pod fields are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PodFieldCheck {
    /// Against the pod view (the API server): the pod must exist on this node with that
    /// UID, namespace, name and service account. Adds labels and owners to the selectors.
    #[default]
    Api,
    /// Take the kubelet's fields as they come. Only where the CSIDriver object is known to
    /// have `podInfoOnMount: true` and nobody else may change it (PI-39, PI-40); tests and
    /// nodes without API access.
    TrustKubelet,
}

/// How long a publish waits for the pod view to learn of a pod the kubelet already runs.
const VIEW_LAG: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum VerifyError {
    #[error(
        "cannot verify the pod's fields: svid-bridge has no view of the Kubernetes API \
         (--kubernetes off or unavailable); use --pod-fields trust-kubelet only if the \
         CSIDriver has podInfoOnMount: true"
    )]
    NoPodView,
    #[error(
        "refused: no pod with UID {uid} is on node {node} in the Kubernetes API (pod fields {fields})"
    )]
    NotOnNode {
        uid: String,
        node: String,
        fields: String,
    },
    #[error(
        "refused: the kubelet's pod fields ({fields}) do not match the API server's pod ({actual})"
    )]
    Mismatch { fields: String, actual: String },
}

/// A pod whose fields were checked, and what SPIRE's attestor would say about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedPod {
    pub fields: PodFields,
    pub selectors: SelectorSet,
}

fn describe(fields: &PodFields) -> String {
    format!(
        "{}/{} uid {} serviceAccount {}",
        fields.namespace, fields.name, fields.uid, fields.service_account
    )
}

/// Checks `fields` as `check` says, waiting briefly for the pod view to catch up.
pub async fn verify(
    fields: PodFields,
    check: PodFieldCheck,
    pods: &Pods,
    node: &str,
) -> Result<VerifiedPod, VerifyError> {
    if check == PodFieldCheck::TrustKubelet {
        let selectors = SelectorSet::new(pod_level_selectors(&fields, node));
        return Ok(VerifiedPod { fields, selectors });
    }
    if !pods.is_on() {
        return Err(VerifyError::NoPodView);
    }
    let deadline = tokio::time::Instant::now() + VIEW_LAG;
    let pod = loop {
        if let Some(pod) = pods.by_uid(&fields.uid) {
            break pod;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(VerifyError::NotOnNode {
                uid: fields.uid.clone(),
                node: node.to_owned(),
                fields: describe(&fields),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    check_against(&fields, &pod, node)?;
    let mut selectors = pod_level_selectors(&fields, node);
    selectors.extend(api_selectors(&pod));
    Ok(VerifiedPod {
        selectors: SelectorSet::new(selectors),
        fields,
    })
}

/// The pod in the API must be that pod, bound to this node.
fn check_against(fields: &PodFields, pod: &ViewPod, node: &str) -> Result<(), VerifyError> {
    let spec = pod.spec.as_ref();
    let actual = PodFields {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        // The API's default when the spec names none.
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
    };
    let on_node = spec.and_then(|s| s.node_name.as_deref()) == Some(node);
    if !on_node {
        return Err(VerifyError::NotOnNode {
            uid: fields.uid.clone(),
            node: node.to_owned(),
            fields: describe(fields),
        });
    }
    if &actual != fields {
        return Err(VerifyError::Mismatch {
            fields: describe(fields),
            actual: describe(&actual),
        });
    }
    Ok(())
}

/// What the k8s attestor emits from the pod's identity alone (PI-21): enough for
/// spire-controller-manager's entries (`k8s:pod-uid`, PI-24) and ns/sa entries.
fn pod_level_selectors(fields: &PodFields, node: &str) -> Vec<Selector> {
    vec![
        Selector::k8s("ns", &fields.namespace),
        Selector::k8s("sa", &fields.service_account),
        Selector::k8s("pod-uid", &fields.uid),
        Selector::k8s("pod-name", &fields.name),
        Selector::k8s("node-name", node),
    ]
}

/// Labels and owners, from the API server's pod (PI-21). Image selectors are left out:
/// they come from container statuses, not stable at mount time (PI-22).
fn api_selectors(pod: &ViewPod) -> Vec<Selector> {
    let labels = pod.metadata.labels.iter().flatten();
    let mut selectors: Vec<Selector> = labels
        .map(|(k, v)| Selector::k8s("pod-label", &format!("{k}:{v}")))
        .collect();
    for owner in pod.metadata.owner_references.iter().flatten() {
        selectors.push(Selector::k8s(
            "pod-owner",
            &format!("{}:{}", owner.kind, owner.name),
        ));
        selectors.push(Selector::k8s(
            "pod-owner-uid",
            &format!("{}:{}", owner.kind, owner.uid),
        ));
    }
    selectors
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::pods::ViewPodSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
    use kube::runtime::reflector::store::Writer;
    use kube::runtime::watcher::Event;

    const UID: &str = "0d9a4c1e-2b7f-4e55-9f0a-5c3b2a1d0e01";

    fn fields() -> PodFields {
        PodFields {
            namespace: "apps".into(),
            name: "db-0".into(),
            uid: UID.into(),
            service_account: "db".into(),
        }
    }

    fn api_pod(node: &str, sa: &str) -> ViewPod {
        ViewPod {
            metadata: ObjectMeta {
                namespace: Some("apps".into()),
                name: Some("db-0".into()),
                uid: Some(UID.into()),
                labels: Some([("app".to_owned(), "db".to_owned())].into()),
                owner_references: Some(vec![OwnerReference {
                    kind: "StatefulSet".into(),
                    name: "db".into(),
                    uid: "11111111-2222-3333-4444-555555555555".into(),
                    api_version: "apps/v1".into(),
                    ..OwnerReference::default()
                }]),
                ..ObjectMeta::default()
            },
            spec: Some(ViewPodSpec {
                node_name: Some(node.into()),
                service_account_name: Some(sa.into()),
            }),
            status: None,
        }
    }

    /// A pod view filled by hand (a fake of the watch), as the reflector would fill it.
    fn view_with(pod: ViewPod) -> Pods {
        let mut writer: Writer<ViewPod> = Writer::default();
        let store = writer.as_reader();
        writer.apply_watcher_event(&Event::Apply(pod));
        Pods::from_store(store, "/proc")
    }

    #[tokio::test]
    async fn trusted_kubelet_fields_give_the_pod_level_selectors() {
        let pod = verify(
            fields(),
            PodFieldCheck::TrustKubelet,
            &Pods::off(),
            "node-a",
        )
        .await
        .unwrap();
        assert_eq!(
            pod.selectors.to_string(),
            format!(
                "k8s:node-name:node-a, k8s:ns:apps, k8s:pod-name:db-0, k8s:pod-uid:{UID}, \
                 k8s:sa:db"
            )
        );
    }

    #[tokio::test]
    async fn the_api_pod_adds_labels_and_owners() {
        let pods = view_with(api_pod("node-a", "db"));
        let pod = verify(fields(), PodFieldCheck::Api, &pods, "node-a")
            .await
            .unwrap();
        let text = pod.selectors.to_string();
        assert!(text.contains("k8s:pod-label:app:db"), "{text}");
        assert!(text.contains("k8s:pod-owner:StatefulSet:db"), "{text}");
        assert!(
            text.contains("k8s:pod-owner-uid:StatefulSet:11111111-2222-3333-4444-555555555555"),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn forged_fields_are_refused_with_what_did_not_match() {
        let pods = view_with(api_pod("node-a", "db"));
        let forged = PodFields {
            service_account: "admin".into(),
            ..fields()
        };
        let err = verify(forged, PodFieldCheck::Api, &pods, "node-a")
            .await
            .unwrap_err();
        assert!(matches!(err, VerifyError::Mismatch { .. }), "{err}");
        assert!(err.to_string().contains("serviceAccount admin"), "{err}");
        assert!(err.to_string().contains("serviceAccount db"), "{err}");

        let elsewhere = view_with(api_pod("node-b", "db"));
        let err = verify(fields(), PodFieldCheck::Api, &elsewhere, "node-a").await;
        assert!(matches!(err, Err(VerifyError::NotOnNode { .. })), "{err:?}");

        let unknown = PodFields {
            uid: "99999999-0000-0000-0000-000000000000".into(),
            ..fields()
        };
        let err = verify(unknown, PodFieldCheck::Api, &pods, "node-a").await;
        assert!(matches!(err, Err(VerifyError::NotOnNode { .. })), "{err:?}");
    }

    #[tokio::test]
    async fn without_a_pod_view_api_checks_refuse() {
        let err = verify(fields(), PodFieldCheck::Api, &Pods::off(), "node-a").await;
        assert_eq!(err, Err(VerifyError::NoPodView));
    }
}
