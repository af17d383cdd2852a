//! A pod-mode volume's request: the pod author's `volumeAttributes` (one table in
//! docs/pod-mode.md) and the pod fields the kubelet adds with `podInfoOnMount` (PI-39).

use std::collections::HashMap;

use super::files::Layout;

/// `volumeAttributes` a pod-mode volume accepts. `mode` is read by the CSI plugin.
pub const MODE: &str = "mode";
pub const FILES: &str = "files";
pub const JWT_AUDIENCES: &str = "jwtAudiences";
pub const LAYOUT: &str = "layout";
pub const FS_GROUP: &str = "fsGroup";
const KNOWN: [&str; 5] = [MODE, FILES, JWT_AUDIENCES, LAYOUT, FS_GROUP];

/// Keys the kubelet adds (PI-39); merged after the pod's attributes, so a pod cannot set
/// them while the CSIDriver has `podInfoOnMount: true` (PI-40).
const KUBELET_PREFIX: &str = "csi.storage.k8s.io/";
pub const POD_NAME: &str = "csi.storage.k8s.io/pod.name";
pub const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
pub const POD_UID: &str = "csi.storage.k8s.io/pod.uid";
pub const SERVICE_ACCOUNT: &str = "csi.storage.k8s.io/serviceAccount.name";

/// At most this many JWT audiences per volume: each is a file and a refresh.
pub const MAX_AUDIENCES: usize = 8;

/// The pod as the kubelet describes it. Not yet trusted: see `super::verify`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PodFields {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
}

/// What the pod author asked for.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VolumeOptions {
    pub files: bool,
    pub jwt_audiences: Vec<String>,
    #[serde(with = "layout_name")]
    pub layout: Layout,
    /// The group that may read the key files: `fsGroup` attribute, else the kubelet's
    /// volume_mount_group (the pod's `securityContext.fsGroup`, PI-45).
    pub group: Option<u32>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum AttributeError {
    #[error(
        "volume attribute {0:?} is not known to svid-bridge in mode: pod (known: mode, files, \
         jwtAudiences, layout, fsGroup)"
    )]
    Unknown(String),
    #[error("volume attribute {name}: {value:?} is not {expected}")]
    Invalid {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error(
        "the kubelet passed no {0}: mode: pod needs the pod's fields, so the CSIDriver object \
         must have podInfoOnMount: true (the chart sets it)"
    )]
    MissingPodField(&'static str),
    #[error("jwtAudiences asks for JWT-SVIDs, which are files: set files: \"true\" as well")]
    AudiencesWithoutFiles,
}

/// Reads a pod-mode NodePublishVolume's context and the kubelet's volume_mount_group.
pub fn parse(
    context: &HashMap<String, String>,
    volume_mount_group: Option<&str>,
) -> Result<(PodFields, VolumeOptions), AttributeError> {
    if let Some(unknown) = context
        .keys()
        .filter(|k| !k.starts_with(KUBELET_PREFIX) && !KNOWN.contains(&k.as_str()))
        .min()
    {
        return Err(AttributeError::Unknown(unknown.clone()));
    }
    let fields = PodFields {
        namespace: pod_field(context, POD_NAMESPACE)?,
        name: pod_field(context, POD_NAME)?,
        uid: pod_field(context, POD_UID)?,
        service_account: pod_field(context, SERVICE_ACCOUNT)?,
    };
    let files = match context.get(FILES).map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => return Err(invalid(FILES, other, "\"true\" or \"false\"")),
    };
    let jwt_audiences = audiences(context.get(JWT_AUDIENCES).map(String::as_str))?;
    if !jwt_audiences.is_empty() && !files {
        return Err(AttributeError::AudiencesWithoutFiles);
    }
    let layout = match context.get(LAYOUT) {
        None => Layout::default(),
        Some(value) => value
            .parse()
            .map_err(|_| invalid(LAYOUT, value, "\"spiffe-helper\" or \"spiffe\""))?,
    };
    let group = match context
        .get(FS_GROUP)
        .map(String::as_str)
        .or(volume_mount_group)
    {
        None => None,
        Some(value) => Some(gid(value)?),
    };
    Ok((
        fields,
        VolumeOptions {
            files,
            jwt_audiences,
            layout,
            group,
        },
    ))
}

fn pod_field(
    context: &HashMap<String, String>,
    key: &'static str,
) -> Result<String, AttributeError> {
    context
        .get(key)
        .filter(|v| !v.is_empty())
        .cloned()
        .ok_or(AttributeError::MissingPodField(key))
}

fn invalid(name: &'static str, value: &str, expected: &'static str) -> AttributeError {
    AttributeError::Invalid {
        name,
        value: value.to_owned(),
        expected,
    }
}

/// `"vault, db"` → `["vault", "db"]`: trimmed, no empties, no duplicates, bounded.
fn audiences(raw: Option<&str>) -> Result<Vec<String>, AttributeError> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    let mut list: Vec<String> = Vec::new();
    for audience in raw.split(',').map(str::trim) {
        if audience.is_empty() || audience.len() > 256 || audience.chars().any(char::is_control) {
            return Err(invalid(
                JWT_AUDIENCES,
                raw,
                "a comma-separated list of non-empty audiences (at most 256 bytes each)",
            ));
        }
        if !list.iter().any(|a| a == audience) {
            list.push(audience.to_owned());
        }
    }
    if list.len() > MAX_AUDIENCES {
        return Err(invalid(JWT_AUDIENCES, raw, "at most 8 audiences"));
    }
    Ok(list)
}

/// A group ID as Linux takes it; 0 would hand keys to root's group, which needs no help.
fn gid(value: &str) -> Result<u32, AttributeError> {
    value
        .parse::<u32>()
        .ok()
        .filter(|g| *g > 0 && *g < u32::MAX)
        .ok_or_else(|| invalid(FS_GROUP, value, "a group ID between 1 and 4294967294"))
}

mod layout_name {
    use super::Layout;

    pub fn serialize<S: serde::Serializer>(layout: &Layout, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match layout {
            Layout::SpiffeHelper => "spiffe-helper",
            Layout::Spiffe => "spiffe",
        })
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Layout, D::Error> {
        let name: String = serde::Deserialize::deserialize(d)?;
        name.parse()
            .map_err(|_| serde::de::Error::custom("unknown layout"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kubelet(extra: &[(&str, &str)]) -> HashMap<String, String> {
        let mut context: HashMap<String, String> = [
            (POD_NAME, "db-0"),
            (POD_NAMESPACE, "apps"),
            (POD_UID, "6f0c1b7e-0000-4000-8000-000000000001"),
            (SERVICE_ACCOUNT, "db"),
            ("csi.storage.k8s.io/ephemeral", "true"),
            (MODE, "pod"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        for (k, v) in extra {
            context.insert((*k).to_owned(), (*v).to_owned());
        }
        context
    }

    #[test]
    fn the_kubelets_fields_and_the_defaults() {
        let (fields, options) = parse(&kubelet(&[]), None).unwrap();
        assert_eq!(fields.namespace, "apps");
        assert_eq!(fields.service_account, "db");
        assert!(!options.files);
        assert_eq!(options.layout, Layout::SpiffeHelper);
        assert_eq!(options.group, None);
    }

    #[test]
    fn files_audiences_layout_and_the_group() {
        let context = kubelet(&[
            (FILES, "true"),
            (JWT_AUDIENCES, " vault, db ,vault"),
            (LAYOUT, "spiffe"),
        ]);
        let (_, options) = parse(&context, Some("999")).unwrap();
        assert!(options.files);
        assert_eq!(options.jwt_audiences, ["vault", "db"]);
        assert_eq!(options.layout, Layout::Spiffe);
        assert_eq!(options.group, Some(999));
        // The attribute wins over the kubelet's fsGroup (csi-driver-spiffe's fs-group, PI-33).
        let context = kubelet(&[(FILES, "true"), (FS_GROUP, "70")]);
        assert_eq!(parse(&context, Some("999")).unwrap().1.group, Some(70));
    }

    #[test]
    fn bad_attributes_say_which_and_what_is_expected() {
        let err = parse(&kubelet(&[("file", "true")]), None).unwrap_err();
        assert!(err.to_string().contains("\"file\" is not known"), "{err}");
        let err = parse(&kubelet(&[(FILES, "yes")]), None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "volume attribute files: \"yes\" is not \"true\" or \"false\""
        );
        let err = parse(&kubelet(&[(JWT_AUDIENCES, "a")]), None).unwrap_err();
        assert_eq!(err, AttributeError::AudiencesWithoutFiles);
        let err = parse(&kubelet(&[(FILES, "true"), (JWT_AUDIENCES, "a,,b")]), None);
        assert!(err.is_err());
        let err = parse(&kubelet(&[(FILES, "true"), (FS_GROUP, "0")]), None).unwrap_err();
        assert!(err.to_string().contains("between 1 and"), "{err}");
        let err = parse(&kubelet(&[(LAYOUT, "pem")]), None).unwrap_err();
        assert!(
            err.to_string().contains("\"spiffe-helper\" or \"spiffe\""),
            "{err}"
        );
    }

    #[test]
    fn without_pod_info_on_mount_the_message_says_so() {
        let mut context = kubelet(&[]);
        context.remove(POD_UID);
        let err = parse(&context, None).unwrap_err();
        assert!(err.to_string().contains("podInfoOnMount: true"), "{err}");
    }
}
