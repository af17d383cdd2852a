//! Which pod and container a process belongs to, from its `/proc/<pid>/cgroup`.
//!
//! The kubelet puts every pod in a cgroup named after the pod's UID and the runtime puts each
//! container in a child named after the container ID. The names differ by cgroup driver and
//! runtime, and the path may carry a prefix (a nested node, a cgroup namespace seen from
//! outside as `/../..`), so the path is read segment by segment, not matched as a whole:
//!
//! | driver   | pod segment                                   | container segment                       |
//! |----------|-----------------------------------------------|-----------------------------------------|
//! | cgroupfs | `pod<uid>`                                    | `<id>` (containerd), `crio-<id>` (CRI-O) |
//! | systemd  | `kubepods[-<qos>]-pod<uid with _ for ->.slice` | `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope` |
//!
//! cgroup v1 lists one line per hierarchy (`4:memory:/kubepods/…`), v2 one line
//! (`0::/kubepods/…`); on a hybrid host both. They name the same pod, so the first line that
//! names one wins. This is only ever a label for logs and Events: identity comes from the SPIRE
//! agent's attestation, never from this.

use std::fmt;

/// The pod (and, when the process runs in a container rather than the pod's own cgroup, the
/// container) that a cgroup path names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCgroup {
    /// The pod's UID as the API server writes it: lowercase, dashed.
    pub pod_uid: String,
    /// The runtime's container ID (64 hex characters for containerd, CRI-O and Docker).
    pub container_id: Option<String>,
}

impl fmt::Display for PodCgroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.container_id {
            Some(id) => write!(f, "pod {} container {}", self.pod_uid, short(id)),
            None => write!(f, "pod {}", self.pod_uid),
        }
    }
}

/// The first 13 characters of a container ID, as `crictl ps` shows it.
fn short(id: &str) -> &str {
    id.get(..13).unwrap_or(id)
}

/// Reads `/proc/<pid>/cgroup` under `proc_root` (`/proc` on a node, with `hostPID`); `None`
/// when the process is gone or is not in a pod.
pub fn pod_of_pid(proc_root: &std::path::Path, pid: u32) -> Option<PodCgroup> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")).ok()?;
    parse_proc_cgroup(&text)
}

/// The pod named by the contents of a `/proc/<pid>/cgroup` file, if any line names one.
pub fn parse_proc_cgroup(text: &str) -> Option<PodCgroup> {
    text.lines()
        .filter_map(|line| line.splitn(3, ':').nth(2))
        .find_map(parse_cgroup_path)
}

/// The pod named by one cgroup path, if it names one.
pub fn parse_cgroup_path(path: &str) -> Option<PodCgroup> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (at, pod_uid) = segments
        .iter()
        .enumerate()
        .find_map(|(i, s)| pod_uid_of_segment(s).map(|uid| (i, uid)))?;
    let container_id = segments
        .get(at + 1)
        .and_then(|s| container_id_of_segment(s));
    Some(PodCgroup {
        pod_uid,
        container_id,
    })
}

/// `pod<uid>` (cgroupfs) or `kubepods[-<qos>]-pod<uid_with_underscores>.slice` (systemd).
fn pod_uid_of_segment(segment: &str) -> Option<String> {
    let raw = match segment.strip_suffix(".slice") {
        Some(slice) => slice.rsplit_once("-pod")?.1,
        None => segment.strip_prefix("pod")?,
    };
    let uid = raw.replace('_', "-").to_ascii_lowercase();
    is_uuid(&uid).then_some(uid)
}

/// `<id>`, `crio-<id>`, or `<runtime>-<id>.scope`; not CRI-O's `crio-conmon-<id>.scope`,
/// which is the monitor process beside the container, not the container.
fn container_id_of_segment(segment: &str) -> Option<String> {
    let name = segment.strip_suffix(".scope").unwrap_or(segment);
    let id = ["cri-containerd-", "crio-", "docker-"]
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))
        .unwrap_or(name);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_owned())
}

/// 8-4-4-4-12 hexadecimal digits.
fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0c9e6a0e-1b37-4c55-9d2a-4f1b0f3f6a21";
    const CID: &str = "5f0c1c7d2b8a4e6f9a3b1c2d4e5f60718293a4b5c6d7e8f9a0b1c2d3e4f5a6b7";

    fn pod(container: Option<&str>) -> Option<PodCgroup> {
        Some(PodCgroup {
            pod_uid: UID.into(),
            container_id: container.map(str::to_owned),
        })
    }

    #[test]
    fn cgroupfs_driver_with_containerd_on_cgroup_v1() {
        // What kubelet 1.34 + containerd 1.6 write on a cgroup v1 hybrid node (cgroupfs driver).
        let text = format!(
            "12:hugetlb:/kubepods/besteffort/pod{UID}/{CID}\n\
             4:memory:/kubepods/besteffort/pod{UID}/{CID}\n\
             1:name=systemd:/kubepods/besteffort/pod{UID}/{CID}\n\
             0::/\n"
        );
        assert_eq!(parse_proc_cgroup(&text), pod(Some(CID)));
    }

    /// Recorded on the test bed's real node: `/proc/<pid>/cgroup` of an Envoy container
    /// (kubelet 1.34, containerd 1.6, cgroupfs driver, cgroup v1 hybrid).
    #[test]
    fn a_real_envoy_pod_on_the_test_node() {
        let text = include_str!("fixtures/containerd-cgroupfs-v1-hybrid.cgroup");
        assert_eq!(
            parse_proc_cgroup(text),
            Some(PodCgroup {
                pod_uid: "9662b00a-3c6e-45e4-9114-16f9cda52e49".into(),
                container_id: Some(
                    "d8488844b7b4eb7714e43922f2a88dfcc39c37e41db8f372417b48f629d67cbe".into()
                ),
            })
        );
    }

    #[test]
    fn guaranteed_pods_have_no_qos_segment() {
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/pod{UID}/{CID}")),
            pod(Some(CID))
        );
    }

    #[test]
    fn systemd_driver_on_cgroup_v2_for_each_runtime() {
        let uid = UID.replace('-', "_");
        for scope in [
            format!("cri-containerd-{CID}.scope"),
            format!("crio-{CID}.scope"),
            format!("docker-{CID}.scope"),
        ] {
            let text = format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/{scope}\n"
            );
            assert_eq!(parse_proc_cgroup(&text), pod(Some(CID)), "{scope}");
        }
        assert_eq!(
            parse_cgroup_path(&format!(
                "/kubepods.slice/kubepods-pod{uid}.slice/cri-containerd-{CID}.scope"
            )),
            pod(Some(CID)),
            "guaranteed QoS"
        );
    }

    #[test]
    fn prefixes_from_nesting_or_a_cgroup_namespace_do_not_matter() {
        for prefix in [
            "/../..",
            "/docker/abc/kubelet",
            "/kubelet.slice/kubelet-kubepods.slice",
        ] {
            let path = format!("{prefix}/kubepods/besteffort/pod{UID}/{CID}");
            assert_eq!(parse_cgroup_path(&path), pod(Some(CID)), "{path}");
        }
    }

    #[test]
    fn the_pod_cgroup_itself_and_cri_o_conmon_name_no_container() {
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/besteffort/pod{UID}")),
            pod(None)
        );
        let uid = UID.replace('-', "_");
        assert_eq!(
            parse_cgroup_path(&format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice/crio-conmon-{CID}.scope"
            )),
            pod(None)
        );
    }

    #[test]
    fn processes_outside_pods_name_none() {
        for text in [
            "0::/system.slice/containerd.service\n",
            "0::/user.slice/user-0.slice/session-1.scope\n",
            "4:memory:/kubepods/besteffort\n",
            "0::/kubepods/podnot-a-uid/x\n",
            "",
            "garbage",
        ] {
            assert_eq!(parse_proc_cgroup(text), None, "{text:?}");
        }
    }

    #[test]
    fn uppercase_uids_are_normalised_as_the_api_server_writes_them() {
        let upper = UID.to_ascii_uppercase();
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/pod{upper}")),
            pod(None)
        );
    }

    #[test]
    fn reads_a_live_process_and_a_gone_one() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::create_dir_all(dir.path().join("42")).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(
            dir.path().join("42/cgroup"),
            format!("0::/kubepods/besteffort/pod{UID}/{CID}\n"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(pod_of_pid(dir.path(), 42), pod(Some(CID)));
        assert_eq!(pod_of_pid(dir.path(), 43), None);
    }

    #[test]
    fn display_is_short_enough_for_a_log_line() {
        assert_eq!(
            pod(Some(CID)).map(|p| p.to_string()).as_deref(),
            Some("pod 0c9e6a0e-1b37-4c55-9d2a-4f1b0f3f6a21 container 5f0c1c7d2b8a4")
        );
    }
}
