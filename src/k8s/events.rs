//! Kubernetes Events on a workload's pod, so that `kubectl describe pod` says what the
//! bridge's log says: when its Envoy has waited too long for an identity
//! ([`WAITING_FOR_IDENTITY`]), when the SVID it is served is near expiry while the agent is
//! unreachable ([`SVID_NEAR_EXPIRY`]), when a pod-mode CSI publish was refused
//! ([`POD_VOLUME_REFUSED`]).
//!
//! Every Event goes through [`PodEvents::warn`]: kube's recorder turns repeats of the same
//! reason on the same pod into one Event series (created once, then its count patched). On
//! top of that: one Event per pod and reason per [`PER_POD_EVERY`], and at most
//! [`MAX_PER_MINUTE`] per bridge (that is, per node) whatever the reason, so a node full of
//! unregistered workloads cannot flood the API server. Only names, reasons and times go into
//! an Event, never certificate or key material (a note that looks like PEM is dropped).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use super::pods::{PodRef, Pods};

/// How long a stream waits before its pod gets an Event (`--wait-event-seconds`).
pub const DEFAULT_WAIT_EVENT_AFTER: Duration = Duration::from_secs(30);
/// At most this many Events per minute from one bridge, all reasons together.
pub const MAX_PER_MINUTE: u32 = 10;
/// One pod gets at most one Event (or series increment) of a reason this often.
pub const PER_POD_EVERY: Duration = Duration::from_secs(60);
/// The API server refuses an Event note over 1 kB.
pub const MAX_NOTE_BYTES: usize = 1000;

/// A workload has waited longer than `--wait-event-seconds` for a secret.
pub const WAITING_FOR_IDENTITY: &str = "WaitingForIdentity";
/// A served SVID expires soon and the SPIRE agent is unreachable (`bridge::expiry`).
pub const SVID_NEAR_EXPIRY: &str = "SVIDNearExpiry";
/// A pod-mode CSI publish was refused.
pub const POD_VOLUME_REFUSED: &str = "PodVolumeRefused";

/// The `action` of a wait Event.
pub const ACTION_SERVE_SECRETS: &str = "ServeSecrets";
/// The `action` of a near-expiry Event.
pub const ACTION_RENEW_SVID: &str = "RenewSVID";
/// The `action` of a refused publish.
pub const ACTION_PUBLISH_VOLUME: &str = "PublishVolume";

/// What one pod's streams have been waiting for, longer than the threshold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodWait {
    pub pod: PodRef,
    pub pid: Option<i32>,
    /// Secret name and why it cannot be served yet, sorted by name.
    pub names: Vec<(String, String)>,
    /// The longest wait among them.
    pub waited: Duration,
}

/// The Event's text: what, how long, what the agent answered, and the likely cause.
pub fn wait_message(wait: &PodWait) -> String {
    let who = match (&wait.pod.container, wait.pid) {
        (Some(c), Some(pid)) => format!("container {c} (PID {pid})"),
        (None, Some(pid)) => format!("PID {pid}"),
        (Some(c), None) => format!("container {c}"),
        (None, None) => "this pod".to_owned(),
    };
    let names: Vec<&str> = wait.names.iter().map(|(n, _)| n.as_str()).collect();
    let mut reasons: Vec<&str> = wait.names.iter().map(|(_, r)| r.as_str()).collect();
    reasons.sort_unstable();
    reasons.dedup();
    let mut text = format!(
        "svid-bridge has waited {}s to serve {who} the SDS secrets {}: {}.",
        wait.waited.as_secs(),
        names.join(", "),
        reasons.join("; ")
    );
    if reasons
        .iter()
        .any(|r| r.contains("no SVID") || r.contains("not answered"))
    {
        text.push_str(
            " Likely cause: no SPIRE registration entry matches this pod (check the entry's \
             selectors, e.g. k8s:ns and k8s:sa, and its parent ID).",
        );
    }
    truncate(text, MAX_NOTE_BYTES)
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max - 3;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

/// Whether a note could carry key or certificate material; such a note is never posted.
pub fn looks_like_key_material(note: &str) -> bool {
    note.contains("-----BEGIN") || note.contains("PRIVATE KEY")
}

/// Which Events may be posted now: per pod and reason, and per minute per node.
#[derive(Debug, Default)]
pub struct Limiter {
    last_per_pod: HashMap<(String, String, &'static str), Instant>,
    window: Option<(Instant, u32)>,
}

impl Limiter {
    /// Whether an Event of `reason` on `pod` may be posted at `now`; if so, counts it.
    pub fn allow(&mut self, pod: &PodRef, reason: &'static str, now: Instant) -> bool {
        let key = (pod.namespace.clone(), pod.name.clone(), reason);
        if self
            .last_per_pod
            .get(&key)
            .is_some_and(|at| now.duration_since(*at) < PER_POD_EVERY)
        {
            return false;
        }
        let (start, sent) = match self.window {
            Some((start, sent)) if now.duration_since(start) < Duration::from_secs(60) => {
                (start, sent)
            }
            _ => (now, 0),
        };
        if sent >= MAX_PER_MINUTE {
            self.window = Some((start, sent));
            return false;
        }
        self.window = Some((start, sent + 1));
        // Forget pods not seen for a while: the map stays as small as the node's pods.
        self.last_per_pod
            .retain(|_, at| now.duration_since(*at) < PER_POD_EVERY);
        self.last_per_pod.insert(key, now);
        true
    }
}

/// What [`PodEvents::warn`] did with an Event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Posted {
    Posted,
    /// The per-pod or per-node limit held it back.
    Limited,
    /// The pod's UID is unknown (not given, and not in the pod view).
    UnknownPod,
    /// The note looked like key material: never posted.
    Refused,
    /// The API server refused it (logged at WARN).
    Failed,
}

/// Posts Warning Events on this node's pods through the pod view's client, within the limits
/// of one shared [`Limiter`]. Clones share the limiter and the recorder's series, so every
/// part of the bridge that posts Events (waits, near expiry, refused publishes) holds one.
#[derive(Clone)]
pub struct PodEvents {
    recorder: Recorder,
    pods: Pods,
    limiter: Arc<Mutex<Limiter>>,
}

impl PodEvents {
    /// `None` without the pod view: no API access, so no Events.
    pub fn new(pods: &Pods) -> Option<Self> {
        let (client, node) = pods.client()?;
        let reporter = Reporter {
            controller: "svid-bridge".into(),
            instance: Some(format!("svid-bridge@{node}")),
        };
        Some(Self {
            recorder: Recorder::new(client, reporter),
            pods: pods.clone(),
            limiter: Arc::default(),
        })
    }

    /// A Warning Event of `reason` on `pod` (UID `uid`, else the pod view's), if the limits
    /// allow: deduplicated per pod and reason, bounded per minute per node. `note` is cut to
    /// the API server's 1 kB; one that looks like PEM is dropped. A failure is logged and
    /// dropped: Events are a courtesy, serving goes on.
    pub async fn warn(
        &mut self,
        pod: &PodRef,
        uid: Option<&str>,
        reason: &'static str,
        action: &'static str,
        note: String,
    ) -> Posted {
        if looks_like_key_material(&note) {
            tracing::error!(%pod, reason, "refusing to post an Event whose note looks like key material");
            return Posted::Refused;
        }
        let Some(uid) = uid
            .map(str::to_owned)
            .or_else(|| self.pods.uid_of(&pod.namespace, &pod.name))
        else {
            tracing::debug!(%pod, reason, "no Event: the pod's UID is unknown");
            return Posted::UnknownPod;
        };
        let allowed = self
            .limiter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .allow(pod, reason, Instant::now());
        if !allowed {
            return Posted::Limited;
        }
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(pod.namespace.clone()),
            name: Some(pod.name.clone()),
            uid: Some(uid),
            ..ObjectReference::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(truncate(note, MAX_NOTE_BYTES)),
            action: action.into(),
            secondary: None,
        };
        match self.recorder.publish(&event, &reference).await {
            Ok(()) => Posted::Posted,
            Err(err) => {
                tracing::warn!(%pod, reason, %err, "cannot post an Event on the pod");
                Posted::Failed
            }
        }
    }

    /// One [`WAITING_FOR_IDENTITY`] Event per pod in `waits` that the limits allow.
    pub async fn publish_waits(&mut self, waits: Vec<PodWait>) {
        for wait in waits {
            let note = wait_message(&wait);
            self.warn(
                &wait.pod,
                None,
                WAITING_FOR_IDENTITY,
                ACTION_SERVE_SECRETS,
                note,
            )
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> PodRef {
        PodRef {
            namespace: "apps".into(),
            name: name.into(),
            container: Some("envoy".into()),
        }
    }

    #[test]
    fn the_message_says_what_why_and_the_likely_cause() {
        let wait = PodWait {
            pod: pod("a"),
            pid: Some(42),
            names: vec![
                (
                    "ROOTCA".into(),
                    "the agent has issued no SVID to this workload".into(),
                ),
                (
                    "default".into(),
                    "the agent has issued no SVID to this workload".into(),
                ),
            ],
            waited: Duration::from_secs(31),
        };
        assert_eq!(
            wait_message(&wait),
            "svid-bridge has waited 31s to serve container envoy (PID 42) the SDS secrets \
             ROOTCA, default: the agent has issued no SVID to this workload. Likely cause: no \
             SPIRE registration entry matches this pod (check the entry's selectors, e.g. \
             k8s:ns and k8s:sa, and its parent ID)."
        );
        let long = PodWait {
            names: (0..200)
                .map(|i| (format!("spiffe://example.org/{i}"), "x".into()))
                .collect(),
            ..wait
        };
        assert!(wait_message(&long).len() <= 1000);
    }

    #[test]
    fn one_event_per_pod_and_reason_per_period_and_a_bounded_number_per_minute() {
        let mut limiter = Limiter::default();
        let t0 = Instant::now();
        assert!(limiter.allow(&pod("a"), WAITING_FOR_IDENTITY, t0));
        let t = t0 + Duration::from_secs(10);
        assert!(!limiter.allow(&pod("a"), WAITING_FOR_IDENTITY, t));
        assert!(
            limiter.allow(&pod("a"), SVID_NEAR_EXPIRY, t),
            "another reason is its own series"
        );
        assert!(limiter.allow(&pod("a"), WAITING_FOR_IDENTITY, t0 + PER_POD_EVERY));
        let t1 = t0 + PER_POD_EVERY * 2;
        let allowed = (0..50)
            .filter(|i| limiter.allow(&pod(&format!("p{i}")), POD_VOLUME_REFUSED, t1))
            .count();
        assert_eq!(allowed, MAX_PER_MINUTE as usize);
        assert!(
            !limiter.allow(&pod("q"), WAITING_FOR_IDENTITY, t1),
            "all reasons share the bound"
        );
        assert!(limiter.allow(
            &pod("late"),
            POD_VOLUME_REFUSED,
            t1 + Duration::from_secs(61)
        ));
    }

    /// A fake API server: answers every request as the real one answers an Event create or
    /// patch (echoing the object) and keeps (method, path, body) of each.
    type Seen = Arc<Mutex<Vec<(String, String, serde_json::Value)>>>;

    fn fake_api_server() -> (kube::Client, Seen) {
        let seen: Seen = Arc::default();
        let record = Arc::clone(&seen);
        let service = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let record = Arc::clone(&record);
            async move {
                let (parts, body) = req.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                let json: serde_json::Value =
                    serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
                record.lock().unwrap_or_else(PoisonError::into_inner).push((
                    parts.method.to_string(),
                    parts.uri.path().to_owned(),
                    json,
                ));
                let status = if parts.method == http::Method::POST {
                    201
                } else {
                    200
                };
                http::Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(bytes.to_vec()))
            }
        });
        (kube::Client::new(service, "default"), seen)
    }

    #[tokio::test]
    async fn warn_posts_deduplicates_bounds_cuts_and_never_sends_pem() {
        let (client, seen) = fake_api_server();
        let (store, _writer) = kube::runtime::reflector::store();
        let pods = Pods::watched(store, "/proc", client, "sb-node".into());
        let mut events = PodEvents::new(&pods).unwrap_or_else(|| panic!("a watched view"));
        let uid = Some("0000-uid");
        let long = "x".repeat(3000);
        assert_eq!(
            events
                .warn(
                    &pod("a"),
                    uid,
                    POD_VOLUME_REFUSED,
                    ACTION_PUBLISH_VOLUME,
                    long
                )
                .await,
            Posted::Posted
        );
        // The same pod and reason within the period: held back, also through a clone.
        let mut clone = events.clone();
        assert_eq!(
            clone
                .warn(
                    &pod("a"),
                    uid,
                    POD_VOLUME_REFUSED,
                    ACTION_PUBLISH_VOLUME,
                    "again".into()
                )
                .await,
            Posted::Limited
        );
        assert_eq!(
            events
                .warn(
                    &pod("b"),
                    None,
                    POD_VOLUME_REFUSED,
                    ACTION_PUBLISH_VOLUME,
                    "b".into()
                )
                .await,
            Posted::UnknownPod,
            "no UID given and none in the view"
        );
        let pem = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMG\n-----END PRIVATE KEY-----".to_owned();
        assert_eq!(
            events
                .warn(
                    &pod("c"),
                    uid,
                    POD_VOLUME_REFUSED,
                    ACTION_PUBLISH_VOLUME,
                    pem
                )
                .await,
            Posted::Refused
        );
        let mut posted = 1;
        for i in 0..20 {
            let note = format!("pod {i}");
            if events
                .warn(
                    &pod(&format!("p{i}")),
                    uid,
                    SVID_NEAR_EXPIRY,
                    ACTION_RENEW_SVID,
                    note,
                )
                .await
                == Posted::Posted
            {
                posted += 1;
            }
        }
        assert_eq!(posted, MAX_PER_MINUTE, "all reasons, one bound per node");

        let seen = seen.lock().unwrap_or_else(PoisonError::into_inner).clone();
        assert_eq!(seen.len(), MAX_PER_MINUTE as usize, "{seen:?}");
        let (method, path, first) = &seen[0];
        assert_eq!(method, "POST");
        assert_eq!(path, "/apis/events.k8s.io/v1/namespaces/apps/events");
        assert_eq!(first["reason"], POD_VOLUME_REFUSED);
        assert_eq!(first["action"], ACTION_PUBLISH_VOLUME);
        assert_eq!(first["type"], "Warning");
        assert_eq!(first["regarding"]["kind"], "Pod");
        assert_eq!(first["regarding"]["name"], "a");
        assert_eq!(first["regarding"]["uid"], "0000-uid");
        assert_eq!(first["reportingInstance"], "svid-bridge@sb-node");
        let note = first["note"].as_str().unwrap_or_default();
        assert_eq!(note.len(), MAX_NOTE_BYTES, "cut to the API server's limit");
        assert!(note.ends_with("..."));
        assert!(
            seen.iter()
                .all(|(_, _, e)| !e.to_string().contains("PRIVATE KEY")),
            "no key material reached the API server"
        );
    }
}
