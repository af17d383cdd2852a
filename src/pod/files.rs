//! SVIDs, bundles and JWT-SVIDs as files, for programs that read their identity from disk
//! (PostgreSQL, MySQL, Vault agents, proxies) instead of asking an SDS or Workload API socket.
//!
//! Two halves:
//!
//! - [`render`] turns what the agent issued to one workload into named file contents, in one
//!   of two [`Layout`]s: spiffe-helper's names (the default, so configs written for
//!   spiffe-helper keep working, PI-34/35) or the draft SPIFFE filesystem delivery layout
//!   (PI-53).
//! - [`AtomicDir`] puts a whole set of files into a directory at once, the way the kubelet
//!   updates Secret and projected volumes (PI-31): readers see either the old set or the new
//!   one, never a half-written file, and a rotation never truncates a file in place (the
//!   problem spiffe-helper has, PI-36).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use pem::{EncodeConfig, LineEnding, Pem};
use rustix::fs::{AtFlags, CWD, Gid, Mode, OFlags};
use rustix::io::Errno;

use crate::identity::types::trust_domain_name;
use crate::identity::{BundleSet, Svid, WorkloadSvids};

/// Which file names and contents [`render`] produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Layout {
    /// spiffe-helper's default names (PI-34, PI-35): `svid.pem` (leaf, then intermediates),
    /// `svid_key.pem` (PKCS#8), `svid_bundle.pem` (the own trust domain's authorities), plus
    /// `federated_bundle.<td>.pem` per federated trust domain. spiffe-helper itself can only
    /// append every federated authority to `svid_bundle.pem`; one file per trust domain is
    /// what the federation requests ask for (PI-52) and what PI-53 mandates ("never merge
    /// bundles"), so the own bundle stays alone in `svid_bundle.pem`.
    #[default]
    SpiffeHelper,
    /// The draft SPIFFE filesystem delivery layout (PI-53): `credential-bundle.pem` (the
    /// PKCS#8 key first, then the chain leaf first: key and certificate rotate together in
    /// one file) and `<td>.spiffe-trust-bundle.pem` per trust domain, own and federated.
    Spiffe,
}

impl Layout {
    /// The name it is parsed from and shown as.
    pub fn as_str(self) -> &'static str {
        match self {
            Layout::SpiffeHelper => "spiffe-helper",
            Layout::Spiffe => "spiffe",
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Layout {
    type Err = FilesError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "spiffe-helper" => Ok(Layout::SpiffeHelper),
            "spiffe" => Ok(Layout::Spiffe),
            other => Err(FilesError::UnknownLayout(other.chars().take(64).collect())),
        }
    }
}

/// One JWT-SVID to write, as `jwt_svid.<audience>.token`.
#[derive(Clone, PartialEq, Eq)]
pub struct JwtFile {
    pub audience: String,
    /// The compact JWS, written as is (no trailing newline, as spiffe-helper writes it).
    pub token: String,
}

impl fmt::Debug for JwtFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtFile")
            .field("audience", &self.audience)
            .field("token", &"(redacted)")
            .finish()
    }
}

/// One file of a set: a plain name (no `/`, not starting with `..`) and its bytes.
/// `secret` files (private keys, JWT-SVIDs) get the restrictive mode ([`AtomicDir`]).
#[derive(Clone, PartialEq, Eq)]
pub struct OutFile {
    pub name: String,
    pub contents: Vec<u8>,
    pub secret: bool,
}

impl OutFile {
    fn public(name: impl Into<String>, contents: Vec<u8>) -> Self {
        Self {
            name: name.into(),
            contents,
            secret: false,
        }
    }

    fn secret(name: impl Into<String>, contents: Vec<u8>) -> Self {
        Self {
            name: name.into(),
            contents,
            secret: true,
        }
    }
}

impl fmt::Debug for OutFile {
    /// Names and sizes only: contents may be a private key or a bearer token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutFile")
            .field("name", &self.name)
            .field("bytes", &self.contents.len())
            .field("secret", &self.secret)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FilesError {
    #[error("unknown file layout {0:?}: expected \"spiffe-helper\" or \"spiffe\"")]
    UnknownLayout(String),
    #[error("the workload holds no X509-SVID")]
    NoSvid,
    #[error("the X509-SVID {0} has an empty certificate chain")]
    EmptyChain(String),
    #[error("no X.509 bundle for the workload's own trust domain {0}")]
    MissingBundle(String),
    #[error("trust domain name {0:?} cannot be part of a file name")]
    BadTrustDomain(String),
    #[error("a JWT-SVID file needs a non-empty audience")]
    EmptyAudience,
    #[error(
        "file name {0:?} is not allowed: it must be 1-255 bytes, without '/' or NUL, and not start with \"..\""
    )]
    BadName(String),
    #[error("two files are named {0:?} (JWT audiences that sanitize to the same name?)")]
    DuplicateName(String),
    #[error("{0:?} already exists in the directory and is not one of our links: not replacing it")]
    NameTaken(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io_err<E: Into<std::io::Error>>(what: impl fmt::Display) -> impl FnOnce(E) -> FilesError {
    let what = what.to_string();
    move |err| FilesError::Io {
        what,
        source: err.into(),
    }
}

// === render ===

/// The files for one workload: its default SVID (the agent's first, B-7), the bundles of
/// its own trust domain and of every trust domain in `svids.federates_with`, one
/// `jwt_svid.<audience>.token` per JWT-SVID, and `jwt_bundle.json` when `jwt_bundles` (trust
/// domain, as name or `spiffe://` ID → JWKS bytes) is given.
///
/// - JWT file names: the audience with every byte outside `[A-Za-z0-9._-]` replaced by `_`
///   (`https://vault.example.org` → `jwt_svid.https___vault.example.org.token`); an empty
///   audience is an error, and so are two audiences that end up with the same name.
/// - `jwt_bundle.json` is spiffe-helper's format (PI-35): a JSON object from trust domain
///   name to the base64 of that trust domain's JWKS, not a plain JWKS. Both layouts get it
///   (PI-53 has nothing for JWT).
/// - A federated trust domain whose bundle has not arrived yet is left out (the next render
///   after it arrives has it); a missing bundle for the own trust domain is an error.
pub fn render(
    layout: Layout,
    svids: &WorkloadSvids,
    bundles: &BundleSet,
    jwt: &[JwtFile],
    jwt_bundles: Option<&BTreeMap<String, Vec<u8>>>,
) -> Result<Vec<OutFile>, FilesError> {
    let svid = svids.svids.first().ok_or(FilesError::NoSvid)?;
    if svid.chain.is_empty() {
        return Err(FilesError::EmptyChain(svid.spiffe_id.clone()));
    }
    let own = svid.trust_domain.as_str();
    check_trust_domain(own)?;
    let own_bundle = bundles
        .get(own)
        .filter(|b| !b.is_empty())
        .ok_or_else(|| FilesError::MissingBundle(own.to_owned()))?;
    let mut federated = Vec::new();
    let federates_with: BTreeSet<&str> = svids
        .federates_with
        .iter()
        .map(|td| trust_domain_name(td))
        .filter(|td| *td != own)
        .collect();
    for td in federates_with {
        check_trust_domain(td)?;
        if let Some(bundle) = bundles.get(td).filter(|b| !b.is_empty()) {
            federated.push((td, bundle));
        }
    }

    let mut files = Vec::new();
    match layout {
        Layout::SpiffeHelper => {
            files.push(OutFile::public("svid.pem", certificates_pem(&svid.chain)));
            files.push(OutFile::secret("svid_key.pem", key_pem(svid)));
            files.push(OutFile::public(
                "svid_bundle.pem",
                certificates_pem(own_bundle),
            ));
            for (td, bundle) in federated {
                files.push(OutFile::public(
                    format!("federated_bundle.{td}.pem"),
                    certificates_pem(bundle),
                ));
            }
        }
        Layout::Spiffe => {
            let mut credential = key_pem(svid);
            credential.extend(certificates_pem(&svid.chain));
            files.push(OutFile::secret("credential-bundle.pem", credential));
            files.push(OutFile::public(
                format!("{own}.spiffe-trust-bundle.pem"),
                certificates_pem(own_bundle),
            ));
            for (td, bundle) in federated {
                files.push(OutFile::public(
                    format!("{td}.spiffe-trust-bundle.pem"),
                    certificates_pem(bundle),
                ));
            }
        }
    }
    for token in jwt {
        files.push(OutFile::secret(
            jwt_file_name(&token.audience)?,
            token.token.as_bytes().to_vec(),
        ));
    }
    if let Some(jwks) = jwt_bundles {
        let by_name: BTreeMap<&str, String> = jwks
            .iter()
            .map(|(td, keys)| (trust_domain_name(td), BASE64.encode(keys)))
            .collect();
        let json = serde_json::to_vec(&by_name).map_err(io_err("encode jwt_bundle.json"))?;
        files.push(OutFile::public("jwt_bundle.json", json));
    }
    check_names(&files)?;
    Ok(files)
}

/// `jwt_svid.<audience, sanitized>.token`.
pub fn jwt_file_name(audience: &str) -> Result<String, FilesError> {
    if audience.is_empty() {
        return Err(FilesError::EmptyAudience);
    }
    let safe: String = audience
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    Ok(format!("jwt_svid.{safe}.token"))
}

/// Trust domain names become parts of file names: only what the SPIFFE ID spec allows in
/// them (lowercase letters, digits, `.`, `-`, `_`), and no leading `.`.
fn check_trust_domain(td: &str) -> Result<(), FilesError> {
    let ok = !td.is_empty()
        && !td.starts_with('.')
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(FilesError::BadTrustDomain(td.chars().take(80).collect()))
    }
}

fn pem_config() -> EncodeConfig {
    EncodeConfig::new().set_line_ending(LineEnding::LF)
}

/// PEM blocks back to back, no blank lines between them (PI-53: no inter-block data).
fn certificates_pem(ders: &[Vec<u8>]) -> Vec<u8> {
    let mut out = String::new();
    for der in ders {
        out.push_str(&pem::encode_config(
            &Pem::new("CERTIFICATE", der.clone()),
            pem_config(),
        ));
    }
    out.into_bytes()
}

fn key_pem(svid: &Svid) -> Vec<u8> {
    pem::encode_config(
        &Pem::new("PRIVATE KEY", svid.key.pkcs8_der().to_vec()),
        pem_config(),
    )
    .into_bytes()
}

// === AtomicDir ===

/// The link readers go through: `..data` → the current `..<timestamp>` directory.
const DATA: &str = "..data";
/// The new link, renamed over [`DATA`].
const DATA_TMP: &str = "..data_tmp";

/// A directory whose file set is replaced as a whole, as the kubelet's atomic writer does
/// for Secret volumes (PI-31):
///
/// ```text
/// <dir>/..2026_…/          the files of one set, never changed after it is published
/// <dir>/..data -> ..2026_… the current set; replaced by rename(2), which is atomic
/// <dir>/svid.pem -> ..data/svid.pem   each visible name
/// <dir>/socket             anything else in <dir> is not ours and is never touched
/// ```
///
/// Every name starting with `..` in `dir` belongs to the writer; visible names are ours when
/// they are symbolic links to `..data/<the same name>`.
///
/// What readers get: a file opened through a visible name is always complete and from one
/// set. Two files opened one after the other (`svid.pem`, then `svid_key.pem`) come from one
/// set unless a swap happens between the two opens; a reader that must get a matching pair
/// opens `..data` once and both files relative to it (`openat`), or reads the single-file
/// `credential-bundle.pem` of [`Layout::Spiffe`], which is why PI-53 has one. PostgreSQL
/// opens `ssl_cert_file` and `ssl_key_file` one after the other (at start and on reload),
/// so it is such a two-open reader: signal its reload after [`AtomicDir::write`] returns,
/// not concurrently with the next write.
///
/// Modes are set explicitly (never from the umask): with a group, directories are 0750 and
/// secrets 0440, both with that group (PostgreSQL accepts a root-owned key up to 0640,
/// PI-38; the group is the pod's fsGroup, PI-45); without one, directories are 0755 and
/// secrets 0400. Certificates and bundles are 0444. Owners stay the writing user's (root in
/// the bridge). `dir` itself gets the directory mode and group too, so the group can reach
/// the files.
///
/// One `AtomicDir` serializes its own writes; two `AtomicDir`s (or processes) must not
/// write the same directory.
#[derive(Debug)]
pub struct AtomicDir {
    dir: PathBuf,
    gid: Option<u32>,
    lock: Mutex<()>,
}

impl AtomicDir {
    pub fn new(dir: PathBuf, gid: Option<u32>) -> Self {
        Self {
            dir,
            gid,
            lock: Mutex::new(()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Replaces the whole visible set at once; returns how many files were written.
    ///
    /// Steps: write every file into a new `..<timestamp>` directory (`O_EXCL|O_NOFOLLOW`,
    /// explicit owner and mode, fsync), link `..data_tmp` to it and rename that over
    /// `..data`, create the visible links that are missing and remove ours that are no
    /// longer in the set, then remove the older `..<timestamp>` directories. A name that
    /// exists in `dir` and is not our link fails the write before anything changes.
    pub fn write(&self, files: &[OutFile]) -> Result<usize, FilesError> {
        let _one_writer = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let names = check_names(files)?;
        std::fs::create_dir_all(&self.dir)
            .map_err(io_err(format_args!("create {}", self.dir.display())))?;
        let dir = open_dir(CWD, &self.dir, &self.dir)?;
        self.set_owner_and_mode(&dir, self.dir_mode(), &self.dir)?;
        for name in &names {
            if visible_link(&dir, name, &self.dir)? == Visible::Foreign {
                return Err(FilesError::NameTaken((*name).to_owned()));
            }
        }

        // 1. The new set, complete and synced, under a name no reader uses yet.
        let payload_name = self.make_payload_dir(&dir)?;
        let payload_path = self.dir.join(&payload_name);
        let payload = open_dir(&dir, &payload_name, &payload_path)?;
        for file in files {
            self.write_file(&payload, file, &payload_path)?;
        }
        self.set_owner_and_mode(&payload, self.dir_mode(), &payload_path)?;
        rustix::fs::fsync(&payload)
            .map_err(io_err(format_args!("fsync {}", payload_path.display())))?;

        // 2. The swap: one rename(2) replaces `..data`.
        match rustix::fs::unlinkat(&dir, DATA_TMP, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(err) => return Err(io_err(format_args!("remove stale {DATA_TMP}"))(err)),
        }
        rustix::fs::symlinkat(payload_name.as_str(), &dir, DATA_TMP)
            .map_err(io_err(format_args!("link {DATA_TMP}")))?;
        rustix::fs::renameat(&dir, DATA_TMP, &dir, DATA).map_err(io_err(format_args!(
            "rename {DATA_TMP} over {DATA} in {}",
            self.dir.display()
        )))?;

        // 3. Visible names: add the new ones, drop ours that left the set.
        for name in &names {
            if visible_link(&dir, name, &self.dir)? == Visible::Missing {
                rustix::fs::symlinkat(format!("{DATA}/{name}"), &dir, *name)
                    .map_err(io_err(format_args!("link {name}")))?;
            }
        }
        let entries = std::fs::read_dir(&self.dir)
            .map_err(io_err(format_args!("list {}", self.dir.display())))?;
        let mut old_payloads = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err(format_args!("list {}", self.dir.display())))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if name.starts_with("..") {
                let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                if is_dir && name != payload_name {
                    old_payloads.push(name);
                }
            } else if !names.contains(name.as_str())
                && visible_link(&dir, &name, &self.dir)? == Visible::Ours
            {
                rustix::fs::unlinkat(&dir, name.as_str(), AtFlags::empty())
                    .map_err(io_err(format_args!("remove stale link {name}")))?;
            }
        }

        // 4. Older sets: no link leads to them any more.
        for name in old_payloads {
            let path = self.dir.join(&name);
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(io_err(format_args!("remove {}", path.display()))(err)),
            }
        }
        rustix::fs::fsync(&dir).map_err(io_err(format_args!("fsync {}", self.dir.display())))?;
        Ok(files.len())
    }

    fn dir_mode(&self) -> u32 {
        if self.gid.is_some() { 0o750 } else { 0o755 }
    }

    fn file_mode(&self, secret: bool) -> u32 {
        match (secret, self.gid.is_some()) {
            (false, _) => 0o444,
            (true, true) => 0o440,
            (true, false) => 0o400,
        }
    }

    /// The group (when one is set) first, then the mode: chown may clear mode bits.
    fn set_owner_and_mode(&self, fd: &OwnedFd, mode: u32, path: &Path) -> Result<(), FilesError> {
        if let Some(gid) = self.gid {
            rustix::fs::fchown(fd, None, Some(Gid::from_raw(gid)))
                .map_err(io_err(format_args!("chown :{gid} {}", path.display())))?;
        }
        rustix::fs::fchmod(fd, Mode::from_raw_mode(mode))
            .map_err(io_err(format_args!("chmod {mode:o} {}", path.display())))
    }

    /// A new, empty `..<seconds>_<nanoseconds>.<random>` directory (0700 until filled).
    fn make_payload_dir(&self, dir: &OwnedFd) -> Result<String, FilesError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        loop {
            let name = format!(
                "..{}_{:09}.{:08x}",
                now.as_secs(),
                now.subsec_nanos(),
                rand::random::<u32>()
            );
            match rustix::fs::mkdirat(dir, name.as_str(), Mode::from_raw_mode(0o700)) {
                Ok(()) => return Ok(name),
                Err(Errno::EXIST) => continue,
                Err(err) => {
                    return Err(io_err(format_args!(
                        "create {}",
                        self.dir.join(&name).display()
                    ))(err));
                }
            }
        }
    }

    fn write_file(&self, payload: &OwnedFd, file: &OutFile, dir: &Path) -> Result<(), FilesError> {
        let path = dir.join(&file.name);
        let fd = rustix::fs::openat(
            payload,
            file.name.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(io_err(format_args!("create {}", path.display())))?;
        self.set_owner_and_mode(&fd, self.file_mode(file.secret), &path)?;
        let mut out = std::fs::File::from(fd);
        out.write_all(&file.contents)
            .map_err(io_err(format_args!("write {}", path.display())))?;
        out.sync_all()
            .map_err(io_err(format_args!("fsync {}", path.display())))
    }
}

fn open_dir(
    at: impl std::os::fd::AsFd,
    name: impl rustix::path::Arg,
    path: &Path,
) -> Result<OwnedFd, FilesError> {
    rustix::fs::openat(
        at,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io_err(format_args!("open directory {}", path.display())))
}

#[derive(Debug, PartialEq, Eq)]
enum Visible {
    Missing,
    /// A link to `..data/<name>`.
    Ours,
    Foreign,
}

fn visible_link(dir: &OwnedFd, name: &str, path: &Path) -> Result<Visible, FilesError> {
    match rustix::fs::readlinkat(dir, name, Vec::new()) {
        Ok(target) if target.as_bytes() == format!("{DATA}/{name}").as_bytes() => Ok(Visible::Ours),
        Ok(_) | Err(Errno::INVAL) => Ok(Visible::Foreign),
        Err(Errno::NOENT) => Ok(Visible::Missing),
        Err(err) => Err(io_err(format_args!(
            "read link {}",
            path.join(name).display()
        ))(err)),
    }
}

/// Every name plain, none starting with `..` (the writer's own namespace), no two alike.
fn check_names(files: &[OutFile]) -> Result<BTreeSet<&str>, FilesError> {
    let mut names = BTreeSet::new();
    for file in files {
        let name = file.name.as_str();
        let plain = !name.is_empty()
            && name.len() <= 255
            && name != "."
            && !name.starts_with("..")
            && !name.contains(['/', '\0']);
        if !plain {
            return Err(FilesError::BadName(name.chars().take(80).collect()));
        }
        if !names.insert(name) {
            return Err(FilesError::DuplicateName(name.to_owned()));
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;
    use crate::identity::types::PrivateKey;

    const GID: u32 = 4242;

    struct Ca {
        params: rcgen::CertificateParams,
        key: rcgen::KeyPair,
        der: Vec<u8>,
    }

    fn ca(name: &str) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        Ca { params, key, der }
    }

    /// A workload in example.org with a fresh key, signed by `ca`; chain = leaf + CA.
    fn workload(ca: &Ca, federates_with: &[&str]) -> WorkloadSvids {
        let params = rcgen::CertificateParams::new(vec!["app.example.org".to_owned()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::Issuer::from_params(&ca.params, &ca.key);
        let leaf = params.signed_by(&key, &issuer).unwrap().der().to_vec();
        WorkloadSvids {
            svids: vec![Svid {
                spiffe_id: "spiffe://example.org/app".to_owned(),
                trust_domain: "example.org".to_owned(),
                chain: vec![leaf, ca.der.clone()],
                key: PrivateKey::from_pkcs8_der(key.serialize_der()),
                expires_at: i64::MAX,
                hint: String::new(),
            }],
            federates_with: federates_with.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn bundles(own: &Ca, others: &[(&str, &Ca)]) -> BundleSet {
        let mut set = BundleSet::default();
        set.bundles
            .insert("example.org".to_owned(), vec![own.der.clone()]);
        for (td, ca) in others {
            set.bundles.insert((*td).to_owned(), vec![ca.der.clone()]);
        }
        set
    }

    fn names(files: &[OutFile]) -> Vec<&str> {
        let mut names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        names.sort_unstable();
        names
    }

    fn file<'a>(files: &'a [OutFile], name: &str) -> &'a OutFile {
        files.iter().find(|f| f.name == name).unwrap()
    }

    fn blocks(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
        pem::parse_many(bytes)
            .unwrap()
            .into_iter()
            .map(|p| (p.tag().to_owned(), p.into_contents()))
            .collect()
    }

    fn certs(ders: &[Vec<u8>]) -> Vec<(String, Vec<u8>)> {
        ders.iter()
            .map(|d| ("CERTIFICATE".to_owned(), d.clone()))
            .collect()
    }

    fn jwt() -> Vec<JwtFile> {
        vec![JwtFile {
            audience: "https://vault.example.org/v1".to_owned(),
            token: "eyJhbGciOi.eyJzdWIi.c2ln".to_owned(),
        }]
    }

    fn jwks() -> BTreeMap<String, Vec<u8>> {
        BTreeMap::from([
            ("spiffe://example.org".to_owned(), b"{\"keys\":[]}".to_vec()),
            ("other.org".to_owned(), b"hello".to_vec()),
        ])
    }

    #[test]
    fn spiffe_helper_layout_round_trips() {
        let (own, other, unused) = (ca("own"), ca("other"), ca("unused"));
        let svids = workload(&own, &["spiffe://other.org", "missing.org"]);
        let set = bundles(&own, &[("other.org", &other), ("unused.org", &unused)]);
        let files = render(Layout::SpiffeHelper, &svids, &set, &jwt(), Some(&jwks())).unwrap();
        assert_eq!(
            names(&files),
            [
                "federated_bundle.other.org.pem",
                "jwt_bundle.json",
                "jwt_svid.https___vault.example.org_v1.token",
                "svid.pem",
                "svid_bundle.pem",
                "svid_key.pem",
            ]
        );
        let svid = &svids.svids[0];
        assert_eq!(
            blocks(&file(&files, "svid.pem").contents),
            certs(&svid.chain)
        );
        assert_eq!(
            blocks(&file(&files, "svid_key.pem").contents),
            [("PRIVATE KEY".to_owned(), svid.key.pkcs8_der().to_vec())]
        );
        assert_eq!(
            blocks(&file(&files, "svid_bundle.pem").contents),
            certs(std::slice::from_ref(&own.der))
        );
        assert_eq!(
            blocks(&file(&files, "federated_bundle.other.org.pem").contents),
            certs(std::slice::from_ref(&other.der))
        );
        let token = file(&files, "jwt_svid.https___vault.example.org_v1.token");
        assert_eq!(token.contents, b"eyJhbGciOi.eyJzdWIi.c2ln");
        let json: serde_json::Value =
            serde_json::from_slice(&file(&files, "jwt_bundle.json").contents).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"example.org": "eyJrZXlzIjpbXX0=", "other.org": "aGVsbG8="})
        );
        let secrets: Vec<&str> = files
            .iter()
            .filter(|f| f.secret)
            .map(|f| f.name.as_str())
            .collect();
        assert_eq!(
            secrets,
            [
                "svid_key.pem",
                "jwt_svid.https___vault.example.org_v1.token"
            ]
        );
        // The leaf parses; no blank lines between blocks.
        let (_, leaf) = x509_parser::parse_x509_certificate(&svid.chain[0]).unwrap();
        assert!(!leaf.is_ca());
        assert!(!String::from_utf8_lossy(&file(&files, "svid.pem").contents).contains("\n\n"));
    }

    #[test]
    fn spiffe_layout_round_trips() {
        let (own, other) = (ca("own"), ca("other"));
        let svids = workload(&own, &["other.org"]);
        let set = bundles(&own, &[("other.org", &other)]);
        let files = render(Layout::Spiffe, &svids, &set, &jwt(), None).unwrap();
        assert_eq!(
            names(&files),
            [
                "credential-bundle.pem",
                "example.org.spiffe-trust-bundle.pem",
                "jwt_svid.https___vault.example.org_v1.token",
                "other.org.spiffe-trust-bundle.pem",
            ]
        );
        let svid = &svids.svids[0];
        let credential = file(&files, "credential-bundle.pem");
        assert!(credential.secret);
        let mut expected = vec![("PRIVATE KEY".to_owned(), svid.key.pkcs8_der().to_vec())];
        expected.extend(certs(&svid.chain));
        assert_eq!(blocks(&credential.contents), expected);
        assert!(
            credential
                .contents
                .starts_with(b"-----BEGIN PRIVATE KEY-----\n")
        );
        assert!(!String::from_utf8_lossy(&credential.contents).contains("\n\n"));
        assert_eq!(
            blocks(&file(&files, "example.org.spiffe-trust-bundle.pem").contents),
            certs(std::slice::from_ref(&own.der))
        );
        assert_eq!(
            blocks(&file(&files, "other.org.spiffe-trust-bundle.pem").contents),
            certs(std::slice::from_ref(&other.der))
        );
    }

    #[test]
    fn render_refuses_what_it_cannot_write() {
        let own = ca("own");
        let set = bundles(&own, &[]);
        let svids = workload(&own, &[]);
        let none = WorkloadSvids::default();
        assert!(matches!(
            render(Layout::SpiffeHelper, &none, &set, &[], None),
            Err(FilesError::NoSvid)
        ));
        assert!(matches!(
            render(
                Layout::SpiffeHelper,
                &svids,
                &BundleSet::default(),
                &[],
                None
            ),
            Err(FilesError::MissingBundle(td)) if td == "example.org"
        ));
        let empty = [JwtFile {
            audience: String::new(),
            token: "t".to_owned(),
        }];
        assert!(matches!(
            render(Layout::SpiffeHelper, &svids, &set, &empty, None),
            Err(FilesError::EmptyAudience)
        ));
        let clash = [
            JwtFile {
                audience: "a/b".to_owned(),
                token: "1".to_owned(),
            },
            JwtFile {
                audience: "a:b".to_owned(),
                token: "2".to_owned(),
            },
        ];
        assert!(matches!(
            render(Layout::Spiffe, &svids, &set, &clash, None),
            Err(FilesError::DuplicateName(name)) if name == "jwt_svid.a_b.token"
        ));
        let bad_td = workload(&own, &["../etc"]);
        assert!(matches!(
            render(Layout::Spiffe, &bad_td, &set, &[], None),
            Err(FilesError::BadTrustDomain(_))
        ));
    }

    #[test]
    fn layouts_parse_by_name() {
        assert_eq!(
            "spiffe-helper".parse::<Layout>().unwrap(),
            Layout::SpiffeHelper
        );
        assert_eq!("spiffe".parse::<Layout>().unwrap(), Layout::Spiffe);
        assert_eq!(Layout::default(), Layout::SpiffeHelper);
        assert_eq!(Layout::Spiffe.to_string(), "spiffe");
        let err = "helper".parse::<Layout>().unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown file layout \"helper\": expected \"spiffe-helper\" or \"spiffe\""
        );
    }

    #[test]
    fn debug_never_shows_secrets() {
        let token = format!("{:?}", jwt()[0]);
        assert!(!token.contains("eyJ"), "{token}");
        let key = OutFile::secret("svid_key.pem", b"-----BEGIN PRIVATE KEY-----".to_vec());
        let shown = format!("{key:?}");
        assert!(!shown.contains("PRIVATE"), "{shown}");
        assert!(shown.contains("svid_key.pem"), "{shown}");
    }

    fn mode(path: &Path) -> (u32, u32) {
        let meta = std::fs::metadata(path).unwrap();
        (meta.permissions().mode() & 0o7777, meta.gid())
    }

    /// The `..<timestamp>` directories in `dir`.
    fn payload_dirs(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("..") && n != DATA)
            .collect()
    }

    #[test]
    fn modes_and_group_are_set_explicitly() {
        let own = ca("own");
        let files = render(
            Layout::SpiffeHelper,
            &workload(&own, &[]),
            &bundles(&own, &[]),
            &jwt(),
            None,
        )
        .unwrap();
        let tmp = tempfile::tempdir().unwrap();

        let grouped = AtomicDir::new(tmp.path().join("grouped"), Some(GID));
        assert_eq!(grouped.write(&files).unwrap(), 4);
        let d = grouped.dir();
        assert_eq!(mode(d), (0o750, GID));
        assert_eq!(mode(&d.join(DATA)), (0o750, GID));
        assert_eq!(mode(&d.join("svid.pem")), (0o444, GID));
        assert_eq!(mode(&d.join("svid_bundle.pem")), (0o444, GID));
        assert_eq!(mode(&d.join("svid_key.pem")), (0o440, GID));
        assert_eq!(
            mode(&d.join("jwt_svid.https___vault.example.org_v1.token")),
            (0o440, GID)
        );
        assert_eq!(
            std::fs::read_link(d.join("svid.pem")).unwrap(),
            Path::new("..data/svid.pem")
        );
        let payloads = payload_dirs(d);
        assert_eq!(payloads.len(), 1, "{payloads:?}");
        assert_eq!(
            std::fs::read_link(d.join(DATA)).unwrap(),
            Path::new(&payloads[0])
        );
        assert_eq!(
            std::fs::read(d.join("svid_key.pem")).unwrap(),
            file(&files, "svid_key.pem").contents
        );

        let plain = AtomicDir::new(tmp.path().join("plain"), None);
        plain.write(&files).unwrap();
        let d = plain.dir();
        assert_eq!(mode(d).0, 0o755);
        assert_eq!(mode(&d.join(DATA)).0, 0o755);
        assert_eq!(mode(&d.join("svid.pem")).0, 0o444);
        assert_eq!(mode(&d.join("svid_key.pem")).0, 0o400);
    }

    #[test]
    fn rewrites_drop_stale_names_and_leave_foreign_entries() {
        let (own, other) = (ca("own"), ca("other"));
        let set = bundles(&own, &[("other.org", &other)]);
        let tmp = tempfile::tempdir().unwrap();
        let dir = AtomicDir::new(tmp.path().join("pod"), Some(GID));
        std::fs::create_dir_all(dir.dir()).unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(dir.dir().join("socket")).unwrap();
        std::fs::write(dir.dir().join("notes"), b"mine").unwrap();
        std::os::unix::fs::symlink("notes", dir.dir().join("alias")).unwrap();

        let first = render(
            Layout::SpiffeHelper,
            &workload(&own, &["other.org"]),
            &set,
            &jwt(),
            None,
        )
        .unwrap();
        dir.write(&first).unwrap();
        assert!(dir.dir().join("federated_bundle.other.org.pem").exists());

        let second = render(Layout::SpiffeHelper, &workload(&own, &[]), &set, &[], None).unwrap();
        assert_eq!(dir.write(&second).unwrap(), 3);
        let mut listed: Vec<String> = std::fs::read_dir(dir.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.starts_with(".."))
            .collect();
        listed.sort();
        assert_eq!(
            listed,
            [
                "alias",
                "notes",
                "socket",
                "svid.pem",
                "svid_bundle.pem",
                "svid_key.pem"
            ]
        );
        assert_eq!(payload_dirs(dir.dir()).len(), 1);
        assert_eq!(std::fs::read(dir.dir().join("notes")).unwrap(), b"mine");
        assert_eq!(
            std::fs::read_link(dir.dir().join("alias")).unwrap(),
            Path::new("notes")
        );
        assert!(
            std::fs::symlink_metadata(dir.dir().join("socket"))
                .unwrap()
                .file_type()
                .is_socket()
        );
        assert_eq!(
            std::fs::read(dir.dir().join("svid.pem")).unwrap(),
            file(&second, "svid.pem").contents
        );

        // Switching layouts replaces every name.
        let spiffe = render(Layout::Spiffe, &workload(&own, &[]), &set, &[], None).unwrap();
        dir.write(&spiffe).unwrap();
        assert!(!dir.dir().join("svid.pem").exists());
        assert!(dir.dir().join("credential-bundle.pem").exists());
    }

    #[test]
    fn foreign_names_and_bad_names_fail_before_anything_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = AtomicDir::new(tmp.path().to_path_buf(), None);
        std::fs::write(tmp.path().join("svid.pem"), b"someone else's").unwrap();
        let files = [OutFile::public("svid.pem", b"x".to_vec())];
        assert!(matches!(
            dir.write(&files),
            Err(FilesError::NameTaken(name)) if name == "svid.pem"
        ));
        assert_eq!(
            std::fs::read(tmp.path().join("svid.pem")).unwrap(),
            b"someone else's"
        );
        assert!(!tmp.path().join(DATA).exists());
        for bad in ["", ".", "..data", "..x", "a/b", "nul\0"] {
            let files = [OutFile::public(bad, Vec::new())];
            assert!(
                matches!(dir.write(&files), Err(FilesError::BadName(_))),
                "{bad:?}"
            );
        }
        let twice = [
            OutFile::public("a", Vec::new()),
            OutFile::secret("a", Vec::new()),
        ];
        assert!(matches!(
            dir.write(&twice),
            Err(FilesError::DuplicateName(_))
        ));
    }

    /// The leaf's public key and the PKCS#8 key's public key, from one `..data` resolution.
    fn read_pair(dir: &Path) -> Option<(Vec<u8>, Vec<u8>)> {
        let data = rustix::fs::openat(
            CWD,
            dir.join(DATA).as_path(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        let read = |name: &str| -> Option<Vec<u8>> {
            let fd =
                rustix::fs::openat(&data, name, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
                    .ok()?;
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut std::fs::File::from(fd), &mut bytes).ok()?;
            Some(bytes)
        };
        // Either open may find the set already removed (ENOENT) after a later swap: retry.
        let cert = read("svid.pem")?;
        let key = read("svid_key.pem")?;
        let leaf = pem::parse_many(&cert).unwrap().remove(0).into_contents();
        let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        let leaf_public = parsed.public_key().subject_public_key.data.to_vec();
        let key_der = pem::parse(&key).unwrap().into_contents();
        let key_public = rcgen::KeyPair::try_from(key_der.as_slice())
            .unwrap()
            .public_key_raw()
            .to_vec();
        Some((leaf_public, key_public))
    }

    #[test]
    fn readers_never_see_a_key_that_does_not_match_its_certificate() {
        const SWAPS: usize = 200;
        let own = ca("own");
        let set = bundles(&own, &[]);
        let sets: Vec<Vec<OutFile>> = (0..8)
            .map(|_| render(Layout::SpiffeHelper, &workload(&own, &[]), &set, &[], None).unwrap())
            .collect();
        let tmp = tempfile::tempdir().unwrap();
        let dir = Arc::new(AtomicDir::new(tmp.path().join("pod"), Some(GID)));
        dir.write(&sets[0]).unwrap();

        let done = Arc::new(AtomicBool::new(false));
        let (checked, retried) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let reader = {
            let (path, done) = (dir.dir().to_path_buf(), done.clone());
            let (checked, retried) = (checked.clone(), retried.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    match read_pair(&path) {
                        Some((leaf, key)) => {
                            assert_eq!(leaf, key, "a key that does not match its certificate");
                            checked.fetch_add(1, Ordering::SeqCst);
                        }
                        None => {
                            retried.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            })
        };
        for i in 1..=SWAPS {
            dir.write(&sets[i % sets.len()]).unwrap();
        }
        // Let the reader check at least once after the last swap too.
        let before = checked.load(Ordering::SeqCst);
        while checked.load(Ordering::SeqCst) == before {
            std::thread::yield_now();
        }
        done.store(true, Ordering::SeqCst);
        reader.join().unwrap();
        assert!(checked.load(Ordering::SeqCst) > 0);
        assert_eq!(payload_dirs(dir.dir()).len(), 1);
        eprintln!(
            "{SWAPS} swaps: {} matching pairs read, {} reads retried (set removed under the reader)",
            checked.load(Ordering::SeqCst),
            retried.load(Ordering::SeqCst)
        );
    }
}
