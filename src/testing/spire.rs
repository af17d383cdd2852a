//! A real SPIRE deployment (server + one agent) on loopback, in a private temp dir.
//!
//! Server: sqlite datastore, `join_token` node attestor, `disk` key manager (so a restarted
//! server keeps its CA), `experimental.cache_reload_interval` 1s. Agent: join token for
//! `spiffe://<td>/node` (the parent of every entry), `insecure_bootstrap`, `disk` key
//! manager (a restarted agent reuses its stored SVID), the `unix` workload attestor with
//! `discover_workload_path` (selectors `unix:path:<exe>`), public and admin sockets in
//! separate directories, `experimental.sync_interval` (default 1s).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use super::proc::{LogFiles, LogSource, Proc, fail_with_logs, wait_until};
use super::{SocketDir, peer, temp_dir, workload_binary};

/// How long SPIRE gets to come up (it is slow on a busy 2-core machine).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Seconds SPIRE backdates a certificate's `not_before` by.
pub const SPIRE_NOT_BEFORE_CUSHION: i64 = 10;
/// How long a new entry may take to reach a workload.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct SpireOptions {
    /// Trust domain name without `spiffe://`. Default `example.org`.
    pub trust_domain: String,
    /// Server `default_x509_svid_ttl`; `None` = SPIRE's default (1h).
    pub default_x509_svid_ttl: Option<Duration>,
    /// Server `ca_ttl`; `None` = SPIRE's default (24h).
    pub ca_ttl: Option<Duration>,
    /// Agent `authorized_delegates` (SPIFFE IDs in this trust domain) for the admin API.
    pub authorized_delegates: Vec<String>,
    /// Agent `experimental.sync_interval`. Default 1s.
    pub sync_interval: Duration,
    /// Unix attestor also emits `unix:sha256:` selectors (hashes the whole binary at every
    /// attestation: slow for Envoy). Default false (`workload_size_limit = -1`).
    pub workload_sha256: bool,
    /// `log_level` of server and agent. Default `DEBUG`.
    pub log_level: String,
    /// Start the agent in [`Spire::start`]. Default true.
    pub start_agent: bool,
}

impl Default for SpireOptions {
    fn default() -> Self {
        SpireOptions {
            trust_domain: "example.org".to_string(),
            default_x509_svid_ttl: None,
            ca_ttl: None,
            authorized_delegates: Vec::new(),
            sync_interval: Duration::from_secs(1),
            workload_sha256: false,
            log_level: "DEBUG".to_string(),
            start_agent: true,
        }
    }
}

impl SpireOptions {
    /// Defaults with another trust domain.
    pub fn trust_domain(td: &str) -> SpireOptions {
        SpireOptions {
            trust_domain: td.to_string(),
            ..SpireOptions::default()
        }
    }
}

/// A registration entry to create. `parent_id` defaults to the agent's node alias
/// (`spiffe://<td>/node`); `federates_with` takes `spiffe://other.td` or `other.td`.
#[derive(Clone, Debug, Default)]
pub struct EntrySpec {
    pub spiffe_id: String,
    /// `type:value`, e.g. `unix:path:/abs/path` or `unix:uid:0`.
    pub selectors: Vec<String>,
    pub federates_with: Vec<String>,
    pub x509_svid_ttl: Option<u32>,
    pub hint: Option<String>,
    pub parent_id: Option<String>,
    pub dns_names: Vec<String>,
}

impl EntrySpec {
    /// An entry for the program at `path` (selector `unix:path:<path>`).
    pub fn for_path(spiffe_id: &str, path: &Path) -> EntrySpec {
        EntrySpec {
            spiffe_id: spiffe_id.to_string(),
            selectors: vec![format!("unix:path:{}", path.display())],
            ..EntrySpec::default()
        }
    }
}

/// What `<binary> api fetch x509 -write <dir>` got from the Workload API.
#[derive(Clone, Debug)]
pub struct X509Fetch {
    /// Where the files are: `svid.N.pem`, `svid.N.key`, `bundle.N.pem`,
    /// `federated_bundle.N.M.pem`.
    pub dir: PathBuf,
    /// The SPIFFE ID (URI SAN) of each SVID's leaf, in the order the agent sent them.
    pub spiffe_ids: Vec<String>,
    /// Trust domains (bare names) of the federated bundles sent with the first SVID.
    pub federated_trust_domains: Vec<String>,
    pub stdout: String,
}

impl X509Fetch {
    /// The i-th SVID's leaf certificate, DER.
    pub fn leaf_der(&self, i: usize) -> Vec<u8> {
        let path = self.dir.join(format!("svid.{i}.pem"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let pems = pem::parse_many(bytes).expect("parse PEM");
        pems.into_iter()
            .next()
            .unwrap_or_else(|| panic!("no certificate in {}", path.display()))
            .into_contents()
    }

    /// The i-th SVID's TTL as SPIRE configured it: `not_after - not_before` minus the 10 s
    /// SPIRE backdates `not_before` by (`NotBeforeCushion`).
    pub fn ttl(&self, i: usize) -> Duration {
        let der = self.leaf_der(i);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("parse X.509");
        let v = cert.validity();
        let secs = v.not_after.timestamp() - v.not_before.timestamp() - SPIRE_NOT_BEFORE_CUSHION;
        Duration::from_secs(u64::try_from(secs).expect("not_after after not_before"))
    }
}

pub struct Spire {
    opts: SpireOptions,
    bin_server: PathBuf,
    bin_agent: PathBuf,
    server_port: u16,
    server_socket: PathBuf,
    agent_socket: PathBuf,
    admin_socket: PathBuf,
    server_conf: PathBuf,
    agent_conf: PathBuf,
    // Processes before the directories, so they die before their files go; the agent
    // before the server.
    agent: Option<Proc>,
    server: Option<Proc>,
    // Held for its lifetime: the directory the sockets live in is removed on drop.
    _sockets: SocketDir,
    dir: tempfile::TempDir,
}

impl Spire {
    /// Starts a server and (unless `opts.start_agent` is false) an attested agent, and waits
    /// until both are healthy.
    pub fn start(opts: SpireOptions) -> Spire {
        let bin_server = peer("spire-server");
        let bin_agent = peer("spire-agent");
        let dir = temp_dir(&format!("spire-{}", opts.trust_domain));
        let sockets = SocketDir::new(dir.path(), "public/api.sock");
        for sub in ["server", "public", "admin"] {
            std::fs::create_dir_all(sockets.path().join(sub)).expect("mkdir socket dir");
        }
        for sub in ["server-data", "agent-data"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("mkdir data dir");
        }
        let mut spire = Spire {
            server_socket: sockets.path().join("server/api.sock"),
            agent_socket: sockets.path().join("public/api.sock"),
            admin_socket: sockets.path().join("admin/admin.sock"),
            server_conf: dir.path().join("server.conf"),
            agent_conf: dir.path().join("agent.conf"),
            server_port: 0,
            bin_server,
            bin_agent,
            opts,
            server: None,
            agent: None,
            _sockets: sockets,
            dir,
        };
        spire.start_server_on_free_port();
        if spire.opts.start_agent {
            let token = spire.generate_join_token();
            spire.write_agent_conf(&token);
            spire.start_agent();
        }
        spire
    }

    /// Two deployments, `a_td` and `b_td`, federated both ways (see [`Spire::federate_with`]).
    pub fn start_federated_pair(a_td: &str, b_td: &str) -> (Spire, Spire) {
        let a = Spire::start(SpireOptions::trust_domain(a_td));
        let b = Spire::start(SpireOptions::trust_domain(b_td));
        a.federate_with(&b);
        (a, b)
    }

    pub fn options(&self) -> &SpireOptions {
        &self.opts
    }

    /// Bare trust domain name, e.g. `example.org`.
    pub fn trust_domain(&self) -> &str {
        &self.opts.trust_domain
    }

    /// `spiffe://<td>`.
    pub fn trust_domain_id(&self) -> String {
        format!("spiffe://{}", self.opts.trust_domain)
    }

    /// `spiffe://<td>/<path>` (path without the leading slash).
    /// Registers the running test binary as `spiffe://<td>/<name>`, so the test itself is a
    /// workload the bridge serves; returns that ID.
    pub fn register_test_binary(&self, name: &str) -> String {
        let id = self.id(name);
        self.create_entry(&EntrySpec::for_path(&id, &super::this_test_binary()));
        id
    }

    pub fn id(&self, path: &str) -> String {
        format!(
            "spiffe://{}/{}",
            self.opts.trust_domain,
            path.trim_start_matches('/')
        )
    }

    /// The agent's node alias, the default parent of entries: `spiffe://<td>/node`.
    pub fn node_id(&self) -> String {
        self.id("node")
    }

    /// The agent's public socket (Workload API + SDS).
    pub fn socket_path(&self) -> &Path {
        &self.agent_socket
    }

    /// The agent's admin socket (Delegated Identity API).
    pub fn admin_socket_path(&self) -> &Path {
        &self.admin_socket
    }

    /// The server's API socket (for `spire-server` CLI commands).
    pub fn server_socket_path(&self) -> &Path {
        &self.server_socket
    }

    pub fn server_port(&self) -> u16 {
        self.server_port
    }

    /// This deployment's temp dir (configs, data dirs, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn agent_pid(&mut self) -> Option<u32> {
        let p = self.agent.as_mut()?;
        p.is_running().then(|| p.pid())
    }

    pub fn server_pid(&mut self) -> Option<u32> {
        let p = self.server.as_mut()?;
        p.is_running().then(|| p.pid())
    }

    /// Server and agent logs, whole.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for p in self.server.iter().chain(self.agent.iter()) {
            s.push_str(&format!("===== {} =====\n{}", p.name(), p.logs()));
        }
        s
    }

    /// A hard-linked copy of `spire-agent` named `name`: run it as
    /// `<path> api fetch x509 -socketPath ...` to be a workload with selector
    /// `unix:path:<path>`.
    pub fn workload_binary(&self, name: &str) -> PathBuf {
        workload_binary(name, &self.bin_agent)
    }

    // ------------------------------------------------------------------ server ----

    fn write_server_conf(&self) {
        let d = self.dir.path();
        let mut extra = String::new();
        if let Some(ttl) = self.opts.default_x509_svid_ttl {
            extra.push_str(&format!(
                "    default_x509_svid_ttl = \"{}s\"\n",
                ttl.as_secs()
            ));
        }
        if let Some(ttl) = self.opts.ca_ttl {
            extra.push_str(&format!("    ca_ttl = \"{}s\"\n", ttl.as_secs()));
        }
        let conf = format!(
            r#"server {{
    bind_address = "127.0.0.1"
    bind_port = "{port}"
    socket_path = "{socket}"
    trust_domain = "{td}"
    data_dir = "{data}"
    log_level = "{level}"
    ca_key_type = "ec-p256"
{extra}    experimental {{
        cache_reload_interval = "1s"
    }}
}}

plugins {{
    DataStore "sql" {{
        plugin_data {{
            database_type = "sqlite3"
            connection_string = "{data}/datastore.sqlite3"
        }}
    }}
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    KeyManager "disk" {{
        plugin_data {{
            keys_path = "{data}/keys.json"
        }}
    }}
}}
"#,
            port = self.server_port,
            socket = self.server_socket.display(),
            td = self.opts.trust_domain,
            data = d.join("server-data").display(),
            level = self.opts.log_level,
        );
        std::fs::write(&self.server_conf, conf).expect("write server.conf");
    }

    /// First start: picks a free port, retrying when another process grabbed it first.
    fn start_server_on_free_port(&mut self) {
        for _attempt in 0..5 {
            self.server_port = super::free_port();
            self.write_server_conf();
            if self.try_start_server() {
                return;
            }
            let logs = self.server.as_ref().map(Proc::logs).unwrap_or_default();
            if !logs.contains("address already in use") {
                let msg = format!(
                    "spire-server ({}) exited during startup",
                    self.trust_domain()
                );
                fail_with_logs(&msg, &[&*self]);
            }
            self.server = None;
        }
        fail_with_logs("spire-server: no free port after 5 attempts", &[&*self]);
    }

    /// Starts the server with its config; true once healthy, false if it exited (then
    /// `self.server` keeps the exited process for its logs).
    fn try_start_server(&mut self) -> bool {
        assert!(
            !self.server.as_mut().is_some_and(Proc::is_running),
            "spire-server is already running"
        );
        let _ = std::fs::remove_file(&self.server_socket);
        let mut cmd = Command::new(&self.bin_server);
        cmd.arg("run").arg("-config").arg(&self.server_conf);
        cmd.current_dir(self.dir.path());
        self.server = Some(Proc::spawn("spire-server", cmd, self.dir.path()));
        let probe = self.probe(&self.bin_server, &["healthcheck"], &self.server_socket);
        let description = format!("spire-server ({}) is healthy", self.trust_domain());
        // The process was started on this thread: a timeout shows its logs.
        wait_until(START_TIMEOUT, &description, || {
            if !self.server.as_mut().is_some_and(Proc::is_running) {
                return Some(false);
            }
            probe().then_some(true)
        })
    }

    /// A closure running `<bin> <args> -socketPath <socket>`, true on exit 0.
    fn probe(&self, bin: &Path, args: &[&str], socket: &Path) -> impl Fn() -> bool + use<> {
        let bin = bin.to_path_buf();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let socket = socket.to_path_buf();
        move || {
            quiet(&bin)
                .args(&args)
                .arg("-socketPath")
                .arg(&socket)
                .status()
                .is_ok_and(|s| s.success())
        }
    }

    /// Starts the stopped server again (same port, data and keys). Waits until healthy.
    pub fn start_server(&mut self) {
        if !self.try_start_server() {
            fail_with_logs("spire-server exited during startup", &[&*self]);
        }
    }

    /// SIGTERM the server (SIGKILL after a deadline) and wait for it to exit.
    pub fn stop_server(&mut self) {
        // The exited process stays, for its logs.
        if let Some(p) = self.server.as_mut() {
            p.stop();
        }
    }

    /// SIGKILL the server.
    pub fn kill_server(&mut self) {
        // The exited process stays, for its logs.
        if let Some(p) = self.server.as_mut() {
            p.kill();
        }
    }

    /// Runs `spire-server <subcommand> -socketPath <server socket> <args>`; stdout on success,
    /// panics with the output on failure.
    pub fn server_cli(&self, subcommand: &[&str], args: &[&str]) -> String {
        self.server_cli_stdin(subcommand, args, None)
    }

    fn server_cli_stdin(&self, subcommand: &[&str], args: &[&str], stdin: Option<&str>) -> String {
        let mut cmd = quiet(&self.bin_server);
        cmd.args(subcommand)
            .arg("-socketPath")
            .arg(&self.server_socket)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = run_with_stdin(cmd, stdin);
        if !out.status.success() {
            panic!(
                "spire-server {} {} failed ({}):\nstdout: {}\nstderr: {}",
                subcommand.join(" "),
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A one-time join token whose agent gets the alias `spiffe://<td>/node`.
    pub fn generate_join_token(&self) -> String {
        let node = self.node_id();
        let out = self.server_cli(
            &["token", "generate"],
            &["-spiffeID", &node, "-ttl", "3600", "-output", "json"],
        );
        let v: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("token generate output {out:?}: {e}"));
        v["value"]
            .as_str()
            .unwrap_or_else(|| panic!("no token in {out}"))
            .to_string()
    }

    /// Creates a registration entry; returns its id.
    pub fn create_entry(&self, spec: &EntrySpec) -> String {
        let parent = spec.parent_id.clone().unwrap_or_else(|| self.node_id());
        let mut args: Vec<String> = vec![
            "-parentID".into(),
            parent,
            "-spiffeID".into(),
            spec.spiffe_id.clone(),
            "-output".into(),
            "json".into(),
        ];
        for s in &spec.selectors {
            args.extend(["-selector".into(), s.clone()]);
        }
        for td in &spec.federates_with {
            let td = if td.starts_with("spiffe://") {
                td.clone()
            } else {
                format!("spiffe://{td}")
            };
            args.extend(["-federatesWith".into(), td]);
        }
        for dns in &spec.dns_names {
            args.extend(["-dns".into(), dns.clone()]);
        }
        if let Some(ttl) = spec.x509_svid_ttl {
            args.extend(["-x509SVIDTTL".into(), ttl.to_string()]);
        }
        if let Some(hint) = &spec.hint {
            args.extend(["-hint".into(), hint.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.server_cli(&["entry", "create"], &args);
        let v: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("entry create output {out:?}: {e}"));
        let result = &v["results"][0];
        let code = result["status"]["code"].as_i64().unwrap_or(-1);
        assert_eq!(code, 0, "entry create {spec:?} failed: {out}");
        result["entry"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no entry id in {out}"))
            .to_string()
    }

    /// Deletes a registration entry by id.
    pub fn delete_entry(&self, id: &str) {
        let out = self.server_cli(&["entry", "delete"], &["-entryID", id, "-output", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("entry delete output {out:?}: {e}"));
        let code = v["results"][0]["status"]["code"].as_i64().unwrap_or(-1);
        assert_eq!(code, 0, "entry delete {id} failed: {out}");
    }

    /// This trust domain's bundle in SPIFFE (JWKS) format.
    pub fn bundle_spiffe(&self) -> String {
        self.server_cli(&["bundle", "show"], &["-format", "spiffe"])
    }

    /// This trust domain's X.509 roots, PEM.
    pub fn bundle_pem(&self) -> String {
        self.server_cli(&["bundle", "show"], &["-format", "pem"])
    }

    /// Stores `bundle` (SPIFFE format) as the federated bundle of `trust_domain`.
    pub fn set_federated_bundle(&self, trust_domain: &str, bundle_spiffe: &str) {
        let id = format!("spiffe://{}", trust_domain.trim_start_matches("spiffe://"));
        self.server_cli_stdin(
            &["bundle", "set"],
            &["-format", "spiffe", "-id", &id],
            Some(bundle_spiffe),
        );
    }

    /// Exchanges bundles both ways (static, a snapshot of the current CAs): entries with
    /// `federates_with` the other trust domain get its bundle.
    pub fn federate_with(&self, other: &Spire) {
        self.set_federated_bundle(other.trust_domain(), &other.bundle_spiffe());
        other.set_federated_bundle(self.trust_domain(), &self.bundle_spiffe());
    }

    // ------------------------------------------------------------------- agent ----

    fn write_agent_conf(&self, join_token: &str) {
        let d = self.dir.path();
        let delegates = self
            .opts
            .authorized_delegates
            .iter()
            .map(|d| format!("\"{d}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let size_limit = if self.opts.workload_sha256 { 0 } else { -1 };
        let conf = format!(
            r#"agent {{
    data_dir = "{data}"
    log_level = "{level}"
    server_address = "127.0.0.1"
    server_port = "{port}"
    socket_path = "{socket}"
    admin_socket_path = "{admin}"
    trust_domain = "{td}"
    insecure_bootstrap = true
    join_token = "{join_token}"
    authorized_delegates = [{delegates}]
    experimental {{
        sync_interval = "{sync}ms"
    }}
}}

plugins {{
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    KeyManager "disk" {{
        plugin_data {{
            directory = "{data}"
        }}
    }}
    WorkloadAttestor "unix" {{
        plugin_data {{
            discover_workload_path = true
            workload_size_limit = {size_limit}
        }}
    }}
}}
"#,
            data = d.join("agent-data").display(),
            level = self.opts.log_level,
            port = self.server_port,
            socket = self.agent_socket.display(),
            admin = self.admin_socket.display(),
            td = self.opts.trust_domain,
            sync = self.opts.sync_interval.as_millis(),
        );
        std::fs::write(&self.agent_conf, conf).expect("write agent.conf");
    }

    /// Starts the agent (the first time it attests with a join token; later it reuses the
    /// SVID in its data dir) and waits until it is healthy.
    pub fn start_agent(&mut self) {
        assert!(
            !self.agent.as_mut().is_some_and(Proc::is_running),
            "spire-agent is already running"
        );
        if !self.agent_conf.exists() {
            let token = self.generate_join_token();
            self.write_agent_conf(&token);
        }
        let _ = std::fs::remove_file(&self.agent_socket);
        let _ = std::fs::remove_file(&self.admin_socket);
        let mut cmd = Command::new(&self.bin_agent);
        cmd.arg("run").arg("-config").arg(&self.agent_conf);
        cmd.current_dir(self.dir.path());
        self.agent = Some(Proc::spawn("spire-agent", cmd, self.dir.path()));
        let probe = self.probe(&self.bin_agent, &["healthcheck"], &self.agent_socket);
        let description = format!("spire-agent ({}) is healthy", self.trust_domain());
        // The process was started on this thread: a timeout shows its logs.
        let healthy = wait_until(START_TIMEOUT, &description, || {
            if !self.agent.as_mut().is_some_and(Proc::is_running) {
                return Some(false);
            }
            probe().then_some(true)
        });
        if !healthy {
            fail_with_logs("spire-agent exited during startup", &[&*self]);
        }
    }

    /// SIGTERM the agent (SIGKILL after a deadline) and wait for it to exit.
    pub fn stop_agent(&mut self) {
        // The exited process stays, for its logs.
        if let Some(p) = self.agent.as_mut() {
            p.stop();
        }
    }

    /// SIGKILL the agent (its sockets stay behind, as after a crash).
    pub fn kill_agent(&mut self) {
        // The exited process stays, for its logs.
        if let Some(p) = self.agent.as_mut() {
            p.kill();
        }
    }

    // --------------------------------------------------------------- workloads ----

    /// Runs `<binary> api fetch x509 -socketPath <agent socket> -write <fresh dir>` (binary:
    /// a copy of spire-agent, see [`Spire::workload_binary`]). `Err` with the output when
    /// the agent gave no SVID (e.g. the entry has not synced yet).
    pub fn fetch_x509(&self, binary: &Path) -> Result<X509Fetch, String> {
        self.fetch_x509_from(binary, &self.agent_socket)
    }

    /// As [`Spire::fetch_x509`], from the Workload API at `socket` (e.g. a pod-mode
    /// volume's socket served by the bridge).
    pub fn fetch_x509_from(&self, binary: &Path, socket: &Path) -> Result<X509Fetch, String> {
        let out_dir = tempfile::Builder::new()
            .prefix("fetch-")
            .tempdir_in(self.dir.path())
            .expect("fetch dir")
            .keep();
        let out = quiet(binary)
            .args(["api", "fetch", "x509", "-timeout", "5s", "-socketPath"])
            .arg(socket)
            .arg("-write")
            .arg(&out_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", binary.display()));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&out_dir);
            return Err(format!(
                "{} api fetch x509: {}\nstdout: {stdout}\nstderr: {}",
                binary.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let mut spiffe_ids = Vec::new();
        for i in 0.. {
            let path = out_dir.join(format!("svid.{i}.pem"));
            if !path.exists() {
                break;
            }
            spiffe_ids.push(leaf_spiffe_id(&path));
        }
        let federated_trust_domains = stdout
            .lines()
            .filter(|l| l.starts_with("Writing federated bundle #"))
            .filter_map(|l| l.split("for trust domain ").nth(1))
            .filter_map(|rest| rest.split(" to file").next())
            // The Workload API keys them by trust domain ID (`spiffe://td`).
            .map(|td| td.trim_start_matches("spiffe://").to_string())
            .collect();
        Ok(X509Fetch {
            dir: out_dir,
            spiffe_ids,
            federated_trust_domains,
            stdout,
        })
    }

    /// Fetches as `binary` until the agent hands it an SVID for `spiffe_id` (an entry was
    /// just created: it takes a sync or two). Panics after [`SYNC_TIMEOUT`] with the logs.
    pub fn wait_for_svid(&self, binary: &Path, spiffe_id: &str) -> X509Fetch {
        let start = std::time::Instant::now();
        let mut interval = Duration::from_millis(50);
        loop {
            let last = match self.fetch_x509(binary) {
                Ok(f) if f.spiffe_ids.iter().any(|id| id == spiffe_id) => return f,
                Ok(f) => format!("the agent sent {:?}", f.spiffe_ids),
                Err(e) => e,
            };
            if start.elapsed() >= SYNC_TIMEOUT {
                let msg = format!(
                    "timed out after {SYNC_TIMEOUT:?} waiting until {} gets an X509-SVID for \
                     {spiffe_id}; last attempt: {last}",
                    binary.display()
                );
                fail_with_logs(&msg, &[self]);
            }
            std::thread::sleep(interval);
            interval = (interval * 2).min(Duration::from_millis(500));
        }
    }
}

impl Drop for Spire {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!(
                "spire ({}): configs and full logs kept in {}",
                self.trust_domain(),
                self.dir.path().display()
            );
        }
    }
}

impl LogSource for Spire {
    fn log_files(&self) -> Vec<Arc<LogFiles>> {
        self.server
            .iter()
            .chain(self.agent.iter())
            .flat_map(LogSource::log_files)
            .collect()
    }
}

/// A command with stdin/stdout/stderr detached (for probes).
fn quiet(bin: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

fn run_with_stdin(mut cmd: Command, stdin: Option<&str>) -> Output {
    use std::io::Write;
    match stdin {
        None => cmd.output().expect("run spire-server"),
        Some(input) => {
            cmd.stdin(Stdio::piped());
            let mut child = cmd.spawn().expect("run spire-server");
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input.as_bytes())
                .expect("write stdin");
            child.wait_with_output().expect("wait spire-server")
        }
    }
}

/// The URI SAN of the first certificate in a PEM file.
pub fn leaf_spiffe_id(pem_path: &Path) -> String {
    let bytes =
        std::fs::read(pem_path).unwrap_or_else(|e| panic!("read {}: {e}", pem_path.display()));
    let pems = pem::parse_many(&bytes).expect("parse PEM");
    let first = pems
        .first()
        .unwrap_or_else(|| panic!("no PEM block in {}", pem_path.display()));
    spiffe_id_of_der(first.contents())
}

/// The URI SAN of a DER certificate.
pub fn spiffe_id_of_der(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parse X.509");
    let san = cert
        .subject_alternative_name()
        .expect("SAN extension")
        .expect("a SAN extension");
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
        .expect("a URI SAN")
}
