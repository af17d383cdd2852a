//! `SVIDNearExpiry` Events: the bridge keeps serving the SVIDs it holds while the SPIRE agent
//! is unreachable, and they cannot be renewed until it is back. When one of them gets close
//! to its expiry, its pod gets an Event saying when it expires and which agent socket does
//! not answer, before its Envoy's TLS starts failing.
//!
//! **Near** is the last sixth of the SVID's lifetime ([`TTL_FRACTION`]): 10 minutes for
//! SPIRE's default 1-hour X.509 SVID, 4 hours for a 24-hour one. The agent renews an SVID at
//! half its lifetime, so an SVID in its last sixth is a third of its lifetime overdue: never
//! the case while the agent works, and early enough for an operator to act. A short agent
//! restart therefore raises nothing, whatever the TTL, and a fixed threshold (say 10 minutes)
//! would fire at once for SVIDs of 10 minutes or less. The check is a pure function of the
//! served SVIDs, the agent's reachability and the time ([`near_expiry`]); the bridge runs it
//! every [`CHECK_EVERY`] and posts through [`super::events::PodEvents`] (its limits apply).

use std::path::Path;
use std::time::Duration;

use super::pods::PodRef;
use crate::identity::describe::{human_duration, rfc3339};

/// An SVID is near expiry in the last `1/TTL_FRACTION` of its lifetime.
pub const TTL_FRACTION: i64 = 6;
/// How often the bridge checks.
pub const CHECK_EVERY: Duration = Duration::from_secs(30);

/// One SVID the bridge serves to a pod's workload: public facts only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedSvid {
    pub pod: PodRef,
    pub pid: Option<i32>,
    pub spiffe_id: String,
    /// Unix seconds, from the certificate.
    pub not_before: i64,
    /// Unix seconds, from the certificate.
    pub not_after: i64,
}

/// One Event to post: on `pod`, with `note`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NearExpiry {
    pub pod: PodRef,
    pub note: String,
}

/// Whether an SVID valid from `not_before` to `not_after` is in the last sixth of its
/// lifetime (or past it) at `now`.
pub fn is_near_expiry(not_before: i64, not_after: i64, now: i64) -> bool {
    let lifetime = not_after.saturating_sub(not_before).max(0);
    not_after.saturating_sub(now) <= lifetime / TTL_FRACTION
}

/// The Events to post now: none while the agent is reachable (it renews on time); else one
/// per pod whose earliest-expiring served SVID is near expiry, naming that SVID, its expiry
/// and the agent's socket.
pub fn near_expiry(
    served: &[ServedSvid],
    agent_reachable: bool,
    agent_socket: &Path,
    now: i64,
) -> Vec<NearExpiry> {
    if agent_reachable {
        return Vec::new();
    }
    let mut by_pod: std::collections::BTreeMap<(String, String), &ServedSvid> =
        std::collections::BTreeMap::new();
    for svid in served
        .iter()
        .filter(|s| is_near_expiry(s.not_before, s.not_after, now))
    {
        let key = (svid.pod.namespace.clone(), svid.pod.name.clone());
        let earlier = by_pod
            .get(&key)
            .is_none_or(|held| svid.not_after < held.not_after);
        if earlier {
            by_pod.insert(key, svid);
        }
    }
    by_pod
        .into_values()
        .map(|svid| NearExpiry {
            pod: svid.pod.clone(),
            note: note(svid, agent_socket, now),
        })
        .collect()
}

fn note(svid: &ServedSvid, agent_socket: &Path, now: i64) -> String {
    let who = match (&svid.pod.container, svid.pid) {
        (Some(c), Some(pid)) => format!("container {c} (PID {pid})"),
        (None, Some(pid)) => format!("PID {pid}"),
        (Some(c), None) => format!("container {c}"),
        (None, None) => "this pod".to_owned(),
    };
    let left = svid.not_after - now;
    let when = if left > 0 {
        format!(
            "expires at {} (in {})",
            rfc3339(svid.not_after),
            human_duration(left)
        )
    } else {
        format!(
            "expired at {} ({} ago)",
            rfc3339(svid.not_after),
            human_duration(-left)
        )
    };
    format!(
        "The SVID {} that svid-bridge serves to {who} {when}, and the SPIRE agent at {} is \
         unreachable: it cannot be renewed until the agent answers again. Check the SPIRE agent \
         on this node (its pod, its logs, its socket).",
        svid.spiffe_id,
        agent_socket.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixed "now" instead of the system clock.
    const FAKE_NOW: i64 = 1_800_000_000;
    const HOUR: i64 = 3600;

    fn fake_served(pod: &str, id: &str, not_before: i64, not_after: i64) -> ServedSvid {
        ServedSvid {
            pod: PodRef {
                namespace: "apps".into(),
                name: pod.into(),
                container: Some("envoy".into()),
            },
            pid: Some(42),
            spiffe_id: id.into(),
            not_before,
            not_after,
        }
    }

    #[test]
    fn near_is_the_last_sixth_of_the_lifetime() {
        // SPIRE's default 1 h SVID: near in its last 10 minutes.
        let issued = FAKE_NOW - HOUR + 601;
        assert!(
            !is_near_expiry(issued, issued + HOUR, FAKE_NOW),
            "10m 1s left"
        );
        let issued = FAKE_NOW - HOUR + 600;
        assert!(is_near_expiry(issued, issued + HOUR, FAKE_NOW), "10m left");
        // A 24 h SVID: near with 4 h left, not with 5 h.
        assert!(is_near_expiry(
            FAKE_NOW - 20 * HOUR,
            FAKE_NOW + 4 * HOUR,
            FAKE_NOW
        ));
        assert!(!is_near_expiry(
            FAKE_NOW - 19 * HOUR,
            FAKE_NOW + 5 * HOUR,
            FAKE_NOW
        ));
        // A 5-minute SVID just issued is not near, though it expires within 10 minutes.
        assert!(!is_near_expiry(FAKE_NOW, FAKE_NOW + 300, FAKE_NOW));
        // Half-life (when the agent renews) is far from near.
        assert!(!is_near_expiry(
            FAKE_NOW - HOUR / 2,
            FAKE_NOW + HOUR / 2,
            FAKE_NOW
        ));
        // Expired counts; a certificate with no lifetime is always near.
        assert!(is_near_expiry(FAKE_NOW - HOUR, FAKE_NOW - 1, FAKE_NOW));
        assert!(is_near_expiry(FAKE_NOW, FAKE_NOW, FAKE_NOW));
    }

    #[test]
    fn nothing_while_the_agent_answers_one_event_per_pod_when_it_does_not() {
        let socket = Path::new("/run/spire/agent-sockets/admin.sock");
        let served = vec![
            // Pod a: two SVIDs near expiry; the earlier one is named.
            fake_served("a", "spiffe://td/a", FAKE_NOW - 55 * 60, FAKE_NOW + 5 * 60),
            fake_served("a", "spiffe://td/a2", FAKE_NOW - 58 * 60, FAKE_NOW + 2 * 60),
            // Pod b: plenty of time left.
            fake_served("b", "spiffe://td/b", FAKE_NOW - 10 * 60, FAKE_NOW + 50 * 60),
        ];
        assert!(near_expiry(&served, true, socket, FAKE_NOW).is_empty());
        let events = near_expiry(&served, false, socket, FAKE_NOW);
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].pod.name, "a");
        let expected = format!(
            "The SVID spiffe://td/a2 that svid-bridge serves to container envoy (PID 42) \
             expires at {} (in 2m 0s), and the SPIRE agent at \
             /run/spire/agent-sockets/admin.sock is unreachable: it cannot be renewed until \
             the agent answers again. Check the SPIRE agent on this node (its pod, its logs, \
             its socket).",
            rfc3339(FAKE_NOW + 120)
        );
        assert_eq!(events[0].note, expected);
        // Later, b is near too, and a's SVID has expired.
        let later = FAKE_NOW + 45 * 60;
        let events = near_expiry(&served, false, socket, later);
        let pods: Vec<&str> = events.iter().map(|e| e.pod.name.as_str()).collect();
        assert_eq!(pods, ["a", "b"]);
        assert!(events[0].note.contains("expired at "), "{}", events[0].note);
        assert!(events[0].note.contains("43m 0s ago"), "{}", events[0].note);
    }
}
