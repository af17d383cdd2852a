//! What the bridge serves each workload right now, for `/debug/workloads` (local only) and
//! `svid-bridge inspect --pod/--pid`: the workload's pod and PID, its SVIDs' public facts,
//! its open streams by name, what they wait for and since when, and Envoy's last NACK.
//!
//! Built from public material only: the report's types have no field a key could go into.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use super::secrets::Waiting;
use crate::clock::unix_now;
use crate::identity::describe::{CertFacts, human_duration, remaining, rfc3339};
use crate::identity::{Cache, SvidState, Workload, WorkloadSvids};
use crate::k8s::events::PodWait;
use crate::k8s::expiry::ServedSvid;
use crate::k8s::{PodRef, Pods};
use crate::telemetry::health::DebugReport;

/// Every open SDS stream, by workload. A stream enters when it opens and leaves when it
/// is dropped; updates happen on requests and on changes of what it waits for, never per
/// push.
#[derive(Default)]
pub struct StreamRegistry {
    next_id: AtomicU64,
    streams: Mutex<HashMap<u64, StreamRecord>>,
}

#[derive(Clone, Debug)]
struct StreamRecord {
    workload: Workload,
    pid: Option<i32>,
    pod: Option<PodRef>,
    api: &'static str,
    names: Vec<String>,
    /// Name → (why, since when, Unix seconds).
    waiting: BTreeMap<String, (&'static str, i64)>,
    last_nack: Option<String>,
}

/// One stream's place in the registry; removes it when dropped.
pub struct StreamEntry {
    id: u64,
    registry: Arc<StreamRegistry>,
    /// The names last recorded: an ACK repeats them, and must not take the registry's lock.
    names: Vec<String>,
}

/// Who a stream serves, as the registry records it.
pub struct StreamOwner {
    pub workload: Workload,
    pub pid: Option<i32>,
    pub pod: Option<PodRef>,
    pub api: &'static str,
}

impl StreamRegistry {
    pub fn open(self: &Arc<Self>, owner: StreamOwner) -> StreamEntry {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let record = StreamRecord {
            workload: owner.workload,
            pid: owner.pid,
            pod: owner.pod,
            api: owner.api,
            names: Vec::new(),
            waiting: BTreeMap::new(),
            last_nack: None,
        };
        self.lock().insert(id, record);
        StreamEntry {
            id,
            registry: Arc::clone(self),
            names: Vec::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, StreamRecord>> {
        // Every update is a single field assignment: a poisoned map is still consistent.
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn records(&self) -> Vec<StreamRecord> {
        self.lock().values().cloned().collect()
    }
}

impl StreamEntry {
    fn update(&self, f: impl FnOnce(&mut StreamRecord)) {
        if let Some(record) = self.registry.lock().get_mut(&self.id) {
            f(record);
        }
    }

    /// The names the stream asks for (none: everything).
    pub fn set_names<'a>(&mut self, names: impl Iterator<Item = &'a String> + Clone) {
        if names.clone().eq(self.names.iter()) {
            return;
        }
        self.names = names.cloned().collect();
        let names = self.names.clone();
        self.update(|r| r.names = names);
    }

    /// What the stream waits for now; a name that was already waiting keeps its start.
    pub fn set_waiting(&self, now: &BTreeMap<String, Waiting>) {
        let at = unix_now();
        self.update(|r| {
            r.waiting = now
                .iter()
                .map(|(name, why)| {
                    let since = r.waiting.get(name).map_or(at, |(_, since)| *since);
                    (name.clone(), (why.0, since))
                })
                .collect();
        });
    }

    pub fn set_nack(&self, message: &str) {
        self.update(|r| r.last_nack = Some(message.to_owned()));
    }
}

impl Drop for StreamEntry {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

/// `/debug/workloads`: the registry's streams grouped by workload, with what the cache
/// holds for each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadsReport {
    /// Whether pod names come from the Kubernetes API (`--kubernetes`).
    pub pod_view: bool,
    /// How many pods of this node the pod view holds (absent without one).
    pub pods_on_node: Option<usize>,
    pub workloads: Vec<WorkloadReport>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadReport {
    /// Absent for the bridge's own identity asked without a visible PID.
    pub pid: Option<i32>,
    pub pod: Option<PodReport>,
    /// `pending` (no answer from the agent yet), `ready`, or `gone` (the process exited).
    pub state: String,
    pub svids: Vec<SvidReport>,
    /// The own trust domain first, then those its entries federate with.
    pub trust_domains: Vec<String>,
    pub streams: Vec<StreamReport>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodReport {
    pub namespace: String,
    pub name: String,
    pub container: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SvidReport {
    pub spiffe_id: String,
    pub trust_domain: String,
    /// Hex, as Envoy's `/certs` shows it.
    pub serial: String,
    /// RFC 3339, UTC.
    pub expires: String,
    /// `in 23h 59m`, `expired 2m 0s ago`.
    pub expires_in: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamReport {
    /// sotw or delta.
    pub api: String,
    /// The names asked for; empty: everything.
    pub names: Vec<String>,
    pub waiting: Vec<WaitReport>,
    /// Envoy's text from its last rejection (NACK) on this stream.
    pub last_nack: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitReport {
    pub name: String,
    pub reason: String,
    /// RFC 3339, UTC.
    pub since: String,
    /// `12s`, `3m 5s`.
    pub waited: String,
}

/// Builds the report from the registry and the cache.
pub struct WorkloadsReporter {
    pub registry: Arc<StreamRegistry>,
    pub cache: Arc<Cache>,
    pub pods: Pods,
}

impl WorkloadsReporter {
    pub fn report(&self) -> WorkloadsReport {
        let now = unix_now();
        // By workload and PID: in Workload API mode every caller shares the bridge's
        // identity, but each process is still its own line for an operator.
        let mut by_workload: BTreeMap<String, (Workload, Vec<StreamRecord>)> = BTreeMap::new();
        for record in self.registry.records() {
            by_workload
                .entry(format!("{:?} {:?}", record.workload, record.pid))
                .or_insert_with(|| (record.workload.clone(), Vec::new()))
                .1
                .push(record);
        }
        let mut workloads: Vec<WorkloadReport> = by_workload
            .into_values()
            .map(|(workload, streams)| {
                let mut report = workload_report(self.cache.svids_of(&workload), streams, now);
                self.complete_pod(&mut report);
                report
            })
            .collect();
        workloads.sort_by_key(|w| {
            (
                w.pod
                    .as_ref()
                    .map(|p| (p.namespace.clone(), p.name.clone())),
                w.pid,
            )
        });
        WorkloadsReport {
            pod_view: self.pods.is_on(),
            pods_on_node: self.pods.is_on().then(|| self.pods.len()),
            workloads,
        }
    }

    /// The pods whose streams have waited for a secret for at least `after`, one entry
    /// per pod with every name its streams wait for (for Events on the pod).
    pub fn waits_over(&self, after: std::time::Duration) -> Vec<PodWait> {
        let now = unix_now();
        let after = i64::try_from(after.as_secs()).unwrap_or(i64::MAX);
        let mut by_pod: BTreeMap<(String, String), PodWait> = BTreeMap::new();
        for record in self.registry.records() {
            let long: Vec<(&String, &(&'static str, i64))> = record
                .waiting
                .iter()
                .filter(|(_, (_, since))| now - since >= after)
                .collect();
            if long.is_empty() {
                continue;
            }
            let Some(pod) = self.pod_of(&record) else {
                continue;
            };
            let entry = by_pod
                .entry((pod.namespace.clone(), pod.name.clone()))
                .or_insert_with(|| PodWait {
                    pod,
                    pid: record.pid,
                    names: Vec::new(),
                    waited: std::time::Duration::ZERO,
                });
            for (name, (reason, since)) in long {
                if !entry.names.iter().any(|(n, _)| n == name) {
                    entry.names.push((name.clone(), (*reason).to_owned()));
                }
                let waited =
                    std::time::Duration::from_secs(u64::try_from(now - since).unwrap_or(0));
                entry.waited = entry.waited.max(waited);
            }
        }
        by_pod
            .into_values()
            .map(|mut w| {
                w.names.sort();
                w
            })
            .collect()
    }

    /// Every SVID the bridge serves to a workload in a pod, once per pod, PID and SPIFFE
    /// ID, with its validity from the certificate (for `SVIDNearExpiry` Events).
    pub fn served_svids(&self) -> Vec<ServedSvid> {
        let mut seen = std::collections::BTreeSet::new();
        let mut served = Vec::new();
        for record in self.registry.records() {
            if !seen.insert(format!("{:?} {:?}", record.workload, record.pid)) {
                continue;
            }
            let Some(SvidState::Ready(svids)) = self.cache.svids_of(&record.workload) else {
                continue;
            };
            let Some(pod) = self.pod_of(&record) else {
                continue;
            };
            for svid in &svids.svids {
                let Some(facts) = svid.chain.first().and_then(|der| CertFacts::of_der(der)) else {
                    continue;
                };
                served.push(ServedSvid {
                    pod: pod.clone(),
                    pid: record.pid,
                    spiffe_id: svid.spiffe_id.clone(),
                    not_before: facts.not_before,
                    not_after: facts.not_after,
                });
            }
        }
        served
    }

    /// The stream's pod: as noted when it opened, or asked again when that lacked the
    /// container (see [`Self::complete_pod`]).
    fn pod_of(&self, record: &StreamRecord) -> Option<PodRef> {
        match (&record.pod, record.pid) {
            (Some(pod), _) if pod.container.is_some() => Some(pod.clone()),
            (pod, Some(pid)) => self.pods.of_pid(pid).or_else(|| pod.clone()),
            (pod, None) => pod.clone(),
        }
    }

    /// A stream notes its pod when it opens; the pod view may not have had it then (a
    /// stream opened before the first list), nor the container (the kubelet reports a
    /// container's ID a moment after it starts). Ask again for what is missing.
    fn complete_pod(&self, report: &mut WorkloadReport) {
        let complete = report.pod.as_ref().is_some_and(|p| p.container.is_some());
        if complete {
            return;
        }
        if let Some(pod) = report.pid.and_then(|pid| self.pods.of_pid(pid)) {
            report.pod = Some(PodReport {
                namespace: pod.namespace,
                name: pod.name,
                container: pod.container,
            });
        }
    }
}

impl DebugReport for WorkloadsReporter {
    fn json(&self) -> String {
        serde_json::to_string_pretty(&self.report())
            .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

fn workload_report(
    state: Option<SvidState>,
    mut streams: Vec<StreamRecord>,
    now: i64,
) -> WorkloadReport {
    streams.sort_by(|a, b| a.names.cmp(&b.names));
    // The pod and PID of the workload: every stream of it has the same (the pod is looked
    // up per stream, so a later stream may know a container an earlier one did not).
    let pid = streams.iter().find_map(|s| s.pid);
    let pod = streams
        .iter()
        .filter_map(|s| s.pod.as_ref())
        .max_by_key(|p| p.container.is_some())
        .map(|p| PodReport {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            container: p.container.clone(),
        });
    let (state, svids) = match state {
        Some(SvidState::Ready(svids)) => ("ready", Some(svids)),
        Some(SvidState::Gone) => ("gone", None),
        Some(SvidState::Pending) | None => ("pending", None),
    };
    WorkloadReport {
        pid,
        pod,
        state: state.to_owned(),
        svids: svids
            .as_deref()
            .map(|s| svid_reports(s, now))
            .unwrap_or_default(),
        trust_domains: svids.as_deref().map(trust_domains).unwrap_or_default(),
        streams: streams.iter().map(|s| stream_report(s, now)).collect(),
    }
}

/// The leaf of each SVID: its key is in the same struct and is never read here.
fn svid_reports(svids: &WorkloadSvids, now: i64) -> Vec<SvidReport> {
    svids
        .svids
        .iter()
        .filter_map(|svid| {
            let facts = CertFacts::of_der(svid.chain.first()?)?;
            Some(SvidReport {
                spiffe_id: svid.spiffe_id.clone(),
                trust_domain: svid.trust_domain.clone(),
                serial: facts.serial,
                expires: rfc3339(facts.not_after),
                expires_in: remaining(facts.not_after, now),
            })
        })
        .collect()
}

fn trust_domains(svids: &WorkloadSvids) -> Vec<String> {
    let mut tds: Vec<String> = svids
        .own_trust_domain()
        .map(str::to_owned)
        .into_iter()
        .collect();
    for td in &svids.federates_with {
        if !tds.contains(td) {
            tds.push(td.clone());
        }
    }
    tds
}

fn stream_report(stream: &StreamRecord, now: i64) -> StreamReport {
    StreamReport {
        api: stream.api.to_owned(),
        names: stream.names.clone(),
        waiting: stream
            .waiting
            .iter()
            .map(|(name, (reason, since))| WaitReport {
                name: name.clone(),
                reason: (*reason).to_owned(),
                since: rfc3339(*since),
                waited: human_duration(now - since),
            })
            .collect(),
        last_nack: stream.last_nack.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::process::ProcessKey;
    use crate::identity::types::{PrivateKey, Svid};

    fn svids() -> (WorkloadSvids, Vec<u8>) {
        let (cert, key_der) =
            crate::identity::describe::self_signed_spiffe_cert("spiffe://example.org/a", None);
        let svids = WorkloadSvids {
            svids: vec![Svid {
                spiffe_id: "spiffe://example.org/a".into(),
                trust_domain: "example.org".into(),
                chain: vec![cert],
                key: PrivateKey::from_pkcs8_der(key_der.clone()),
                expires_at: unix_now() + 3600,
                hint: String::new(),
            }],
            federates_with: vec!["other.org".into()],
        };
        (svids, key_der)
    }

    fn record(registry: &Arc<StreamRegistry>, pid: i32, pod: Option<PodRef>) -> StreamEntry {
        registry.open(StreamOwner {
            workload: Workload::Process(ProcessKey { pid, start_time: 1 }),
            pid: Some(pid),
            pod,
            api: "sotw",
        })
    }

    #[test]
    fn streams_enter_update_and_leave() {
        let registry = Arc::new(StreamRegistry::default());
        let mut a = record(&registry, 7, None);
        let b = record(&registry, 7, None);
        a.set_names(["default".to_owned()].iter());
        let waiting = BTreeMap::from([("spiffe://example.org/x".to_owned(), Waiting("not yet"))]);
        b.set_waiting(&waiting);
        b.set_nack("bad cert");
        let records = registry.records();
        assert_eq!(records.len(), 2);
        let report = workload_report(None, records, unix_now());
        assert_eq!(report.pid, Some(7));
        assert_eq!(report.state, "pending");
        assert_eq!(report.streams.len(), 2);
        let waiting_stream = report
            .streams
            .iter()
            .find(|s| !s.waiting.is_empty())
            .unwrap_or_else(|| panic!("{report:?}"));
        assert_eq!(waiting_stream.waiting[0].reason, "not yet");
        assert_eq!(waiting_stream.last_nack.as_deref(), Some("bad cert"));
        drop(a);
        drop(b);
        assert!(registry.records().is_empty());
    }

    #[test]
    fn a_wait_keeps_its_start_while_it_lasts() {
        let registry = Arc::new(StreamRegistry::default());
        let s = record(&registry, 7, None);
        let waiting = BTreeMap::from([("x".to_owned(), Waiting("not yet"))]);
        s.set_waiting(&waiting);
        s.update(|r| {
            if let Some(w) = r.waiting.get_mut("x") {
                w.1 -= 90;
            }
        });
        s.set_waiting(&waiting);
        let report = workload_report(None, registry.records(), unix_now());
        assert_eq!(report.streams[0].waiting[0].waited, "1m 30s");
    }

    #[tokio::test]
    async fn long_waits_are_grouped_by_pod_for_events() {
        let registry = Arc::new(StreamRegistry::default());
        let pod = PodRef {
            namespace: "apps".into(),
            name: "w".into(),
            container: Some("envoy".into()),
        };
        let a = record(&registry, 7, Some(pod.clone()));
        let b = record(&registry, 7, Some(pod));
        let _no_pod = record(&registry, 8, None);
        for (entry, name) in [(&a, "default"), (&b, "ROOTCA")] {
            entry.set_waiting(&BTreeMap::from([(name.to_owned(), Waiting("no SVID"))]));
            entry.update(|r| {
                if let Some(w) = r.waiting.get_mut(name) {
                    w.1 -= 40;
                }
            });
        }
        let reporter = WorkloadsReporter {
            registry: Arc::clone(&registry),
            cache: Cache::new(
                Arc::new(crate::identity::WorkloadApiSource::new(
                    "/nonexistent".into(),
                )),
                crate::identity::CacheOptions::default(),
                tokio_util::sync::CancellationToken::new(),
            ),
            pods: Pods::off(),
        };
        assert!(
            reporter
                .waits_over(std::time::Duration::from_secs(60))
                .is_empty()
        );
        let waits = reporter.waits_over(std::time::Duration::from_secs(30));
        assert_eq!(waits.len(), 1, "{waits:?}");
        assert_eq!(waits[0].pod.name, "w");
        assert_eq!(waits[0].pid, Some(7));
        let names: Vec<&str> = waits[0].names.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["ROOTCA", "default"]);
        assert!(waits[0].waited >= std::time::Duration::from_secs(40));
    }

    #[test]
    fn the_report_names_pod_svid_serial_and_trust_domains_and_never_the_key() {
        let registry = Arc::new(StreamRegistry::default());
        let pod = PodRef {
            namespace: "apps".into(),
            name: "envoy-a".into(),
            container: Some("envoy".into()),
        };
        let _s = record(&registry, 7, Some(pod));
        let (svids, key_der) = svids();
        let report = workload_report(
            Some(SvidState::Ready(Arc::new(svids))),
            registry.records(),
            unix_now(),
        );
        let pod = report.pod.clone().unwrap_or_else(|| panic!("pod"));
        assert_eq!(
            (pod.namespace.as_str(), pod.name.as_str()),
            ("apps", "envoy-a")
        );
        assert_eq!(report.svids[0].spiffe_id, "spiffe://example.org/a");
        assert!(!report.svids[0].serial.starts_with("00"));
        assert!(report.svids[0].expires_in.starts_with("in "));
        assert_eq!(report.trust_domains, ["example.org", "other.org"]);
        let json = serde_json::to_string(&report).unwrap_or_else(|e| panic!("{e}"));
        assert!(!json.contains("PRIVATE KEY"));
        let hex: String = key_der.iter().map(|b| format!("{b:02x}")).collect();
        let pem = pem::encode(&pem::Pem::new("PRIVATE KEY", key_der.clone()));
        let base64_body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        for secret in [
            hex.as_str(),
            &base64_body[..40],
            &base64_body[base64_body.len() - 40..],
        ] {
            assert!(!json.contains(secret), "key material in the report");
        }
        let back: WorkloadReport = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, report);
    }
}
