//! Kubernetes Events on a workload's pod when its Envoy has waited too long for an identity,
//! so that `kubectl describe pod` says what the bridge's log says: which secrets, what the
//! agent answered, and the likely cause.
//!
//! Events go through kube's recorder, which turns repeats of the same reason on the same
//! pod into one Event series (created once, then its count patched). On top of that: one
//! Event per pod per [`PER_POD_EVERY`], and at most [`MAX_PER_MINUTE`] per bridge (that is,
//! per node), so a node full of unregistered workloads cannot flood the API server. Only
//! names and reasons go into an Event, never certificate or key material.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use super::pods::{PodRef, Pods};

/// How long a stream waits before its pod gets an Event (`--wait-event-seconds`).
pub const DEFAULT_WAIT_EVENT_AFTER: Duration = Duration::from_secs(30);
/// At most this many Events per minute from one bridge.
pub const MAX_PER_MINUTE: u32 = 10;
/// One pod gets at most one Event (or series increment) this often.
pub const PER_POD_EVERY: Duration = Duration::from_secs(60);
/// The Event's reason, as `kubectl describe` and `kubectl get events` show it.
pub const WAITING_REASON: &str = "WaitingForIdentity";

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
    // The API server refuses a note over 1 kB.
    truncate(text, 1000)
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

/// Which waits may be published now: per pod and per minute limits.
#[derive(Debug, Default)]
pub struct Limiter {
    last_per_pod: HashMap<(String, String), Instant>,
    window: Option<(Instant, u32)>,
}

impl Limiter {
    pub fn allow(&mut self, pod: &PodRef, now: Instant) -> bool {
        let key = (pod.namespace.clone(), pod.name.clone());
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

/// Publishes wait Events on pods, through the pod view's client.
pub struct WaitEvents {
    recorder: Recorder,
    pods: Pods,
    limiter: Limiter,
}

impl WaitEvents {
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
            limiter: Limiter::default(),
        })
    }

    /// Publishes one Event per pod in `waits` that the limits allow. A failure is logged
    /// and dropped: Events are a courtesy, serving goes on.
    pub async fn publish(&mut self, waits: Vec<PodWait>) {
        for wait in waits {
            if !self.limiter.allow(&wait.pod, Instant::now()) {
                continue;
            }
            let Some(uid) = self.pods.uid_of(&wait.pod.namespace, &wait.pod.name) else {
                continue;
            };
            let reference = ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                namespace: Some(wait.pod.namespace.clone()),
                name: Some(wait.pod.name.clone()),
                uid: Some(uid),
                ..ObjectReference::default()
            };
            let event = Event {
                type_: EventType::Warning,
                reason: WAITING_REASON.into(),
                note: Some(wait_message(&wait)),
                action: "ServeSecrets".into(),
                secondary: None,
            };
            if let Err(err) = self.recorder.publish(&event, &reference).await {
                tracing::warn!(pod = %wait.pod, %err, "cannot post an Event on the pod");
            }
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
    fn one_event_per_pod_per_period_and_a_bounded_number_per_minute() {
        let mut limiter = Limiter::default();
        let t0 = Instant::now();
        assert!(limiter.allow(&pod("a"), t0));
        assert!(!limiter.allow(&pod("a"), t0 + Duration::from_secs(10)));
        assert!(limiter.allow(&pod("a"), t0 + PER_POD_EVERY));
        let t1 = t0 + PER_POD_EVERY * 2;
        let allowed = (0..50)
            .filter(|i| limiter.allow(&pod(&format!("p{i}")), t1))
            .count();
        assert_eq!(allowed, MAX_PER_MINUTE as usize);
        assert!(limiter.allow(&pod("late"), t1 + Duration::from_secs(61)));
    }
}
