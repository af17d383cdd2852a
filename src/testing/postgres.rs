//! A throw-away PostgreSQL server that authenticates clients by their certificate, for the
//! pod-files tests: the real consumer of `svid.pem`/`svid_key.pem` files (PI-37, PI-38).
//!
//! Debian's PostgreSQL (tests/peers/install.sh apt-installs `postgresql`), run from
//! `/usr/lib/postgresql/<newest version>/bin`, as the package's `postgres` user, in a private
//! temp dir, on a free loopback port and a Unix socket in that dir. TLS only for TCP:
//!
//! ```text
//! pg_hba.conf:  local   all postgres              peer                     (admin, over the socket)
//!               hostssl all all      127.0.0.1/32 cert clientcert=verify-full map=spiffe [clientname=DN]
//! pg_ident.conf: spiffe <system user> <role>      (PostgresOptions::ident)
//! ```
//!
//! Files written by `pod::files::AtomicDir` with a group are root-owned, 0440 (keys) in a
//! 0750 directory of that group. PostgreSQL accepts such a key (owned by root, at most 0640,
//! PI-38) but must be in the group to read it: the server runs under
//! `setpriv --reuid=postgres --regid=postgres --groups=<postgres's gid>,<extra groups>`, which
//! sets the supplementary groups without the group existing in /etc/group. Without it the
//! server stops at start with `could not load server certificate file ...: Permission
//! denied`; with a group-writable key it stops with `private key file ... has group or world
//! access`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::proc::{LogFiles, LogSource, Proc, fail_with_logs, success_stdout, wait_until};
use super::{SocketDir, free_port};

/// Where Debian installs the server binaries: `<this>/<major version>/bin`.
pub const DEBIAN_PG_ROOT: &str = "/usr/lib/postgresql";
/// How long the server gets to come up.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one query of a [`PsqlSession`] may take.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// `/usr/lib/postgresql/<newest version>/bin` (the one with `initdb`). Panics when there is
/// none: run `make peers`.
pub fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(DEBIAN_PG_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((major, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL is missing ({DEBIAN_PG_ROOT}/<version>/bin/initdb): run `make peers`"
        ),
    }
}

/// The package's `postgres` user: (uid, gid).
pub fn postgres_user() -> (u32, u32) {
    let user = nix::unistd::User::from_name("postgres")
        .expect("look up the postgres user")
        .expect("no `postgres` user: is Debian's postgresql installed (`make peers`)?");
    (user.uid.as_raw(), user.gid.as_raw())
}

#[derive(Clone, Debug)]
pub struct PostgresOptions {
    /// `ssl_cert_file`, `ssl_key_file`, `ssl_ca_file` (the CA clients must chain to).
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: PathBuf,
    /// Lines of the `spiffe` map in pg_ident.conf: (system user as PostgreSQL sees the
    /// certificate, database role). A system user is written quoted.
    pub ident: Vec<(String, String)>,
    /// `clientname=` of the hostssl line: `CN` (PostgreSQL's default: the subject's
    /// common name) or `DN` (the whole subject, RFC 2253).
    pub clientname: String,
    /// Supplementary groups of the server besides `postgres`'s own (e.g. the group of files
    /// an `AtomicDir` wrote).
    pub groups: Vec<u32>,
    /// Roles created with LOGIN once the server is up.
    pub roles: Vec<String>,
}

/// The client side of a TLS connection: `sslcert`, `sslkey`, `sslrootcert`.
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub root: PathBuf,
}

impl ClientTls {
    /// spiffe-helper's names in `dir`: `svid.pem`, `svid_key.pem`, `svid_bundle.pem`.
    pub fn spiffe_helper(dir: &Path) -> ClientTls {
        ClientTls {
            cert: dir.join("svid.pem"),
            key: dir.join("svid_key.pem"),
            root: dir.join("svid_bundle.pem"),
        }
    }
}

pub struct Postgres {
    server: Option<Proc>,
    bin: PathBuf,
    data: PathBuf,
    socket_dir: PathBuf,
    port: u16,
    setpriv_ids: Vec<String>,
    _sockets: SocketDir,
    dir: tempfile::TempDir,
}

impl Postgres {
    /// initdb, the TLS and authentication config, the server started and ready, the roles
    /// created.
    pub fn start(opts: &PostgresOptions) -> Postgres {
        let bin = bin_dir();
        let (uid, gid) = postgres_user();
        let mut groups = vec![gid.to_string()];
        groups.extend(opts.groups.iter().map(u32::to_string));
        let setpriv_ids = vec![
            format!("--reuid={uid}"),
            format!("--regid={gid}"),
            format!("--groups={}", groups.join(",")),
        ];

        // Under /tmp, not target/test-tmp: the server runs as `postgres` and must traverse
        // every directory above its data dir, and a checkout may sit under one only root can
        // enter (a fresh clone in a `mktemp -d` directory, as `make fresh-check` makes).
        let mut dir = tempfile::Builder::new()
            .prefix("sb-postgres-")
            .tempdir_in("/tmp")
            .expect("create a temp dir under /tmp");
        if super::keep_tmp() {
            dir.disable_cleanup(true);
        }
        chmod(dir.path(), 0o755);
        let data = dir.path().join("data");
        let sockets = SocketDir::new(dir.path(), "pg/.s.PGSQL.65535.lock");
        chmod(sockets.path(), 0o755);
        let socket_dir = sockets.path().join("pg");
        for d in [&data, &socket_dir] {
            std::fs::create_dir_all(d).expect("mkdir");
            nix::unistd::chown(
                d.as_path(),
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            )
            .expect("chown to postgres");
            chmod(d, 0o700);
        }

        let mut pg = Postgres {
            server: None,
            bin,
            data,
            socket_dir,
            port: 0,
            setpriv_ids,
            _sockets: sockets,
            dir,
        };
        let out = pg
            .as_postgres("initdb")
            .arg("-D")
            .arg(&pg.data)
            .args([
                "-U",
                "postgres",
                "-A",
                "peer",
                "-E",
                "UTF8",
                "--locale=C",
                "-N",
            ])
            .output()
            .expect("run initdb");
        success_stdout("initdb", &out);
        pg.write_auth_config(opts);
        pg.start_on_free_port(opts);
        for role in &opts.roles {
            pg.admin_sql(&format!("CREATE ROLE \"{role}\" LOGIN"));
        }
        pg
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log, whole.
    pub fn log(&self) -> String {
        self.server.as_ref().map(Proc::logs).unwrap_or_default()
    }

    /// `<bin>/<program>` run as `postgres` with the server's groups.
    fn as_postgres(&self, program: &str) -> Command {
        let mut cmd = Command::new("setpriv");
        cmd.args(&self.setpriv_ids)
            .arg("--")
            .arg(self.bin.join(program))
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        cmd
    }

    fn write_auth_config(&self, opts: &PostgresOptions) {
        let clientname = match opts.clientname.as_str() {
            "" | "CN" => String::new(),
            other => format!(" clientname={other}"),
        };
        let hba = format!(
            "local   all all                 peer\n\
             hostssl all all 127.0.0.1/32    cert clientcert=verify-full map=spiffe{clientname}\n"
        );
        std::fs::write(self.data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        let ident: String = opts
            .ident
            .iter()
            .map(|(system, role)| format!("spiffe \"{system}\" \"{role}\"\n"))
            .collect();
        std::fs::write(self.data.join("pg_ident.conf"), ident).expect("write pg_ident.conf");
    }

    fn write_server_conf(&self, opts: &PostgresOptions) {
        let conf = format!(
            "\n# svid-bridge test kit\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = '{sockets}'\n\
             ssl = on\n\
             ssl_cert_file = '{cert}'\n\
             ssl_key_file = '{key}'\n\
             ssl_ca_file = '{ca}'\n\
             shared_buffers = 16MB\n\
             max_connections = 20\n\
             fsync = off\n\
             log_connections = on\n\
             log_disconnections = on\n",
            port = self.port,
            sockets = self.socket_dir.display(),
            cert = opts.cert_file.display(),
            key = opts.key_file.display(),
            ca = opts.ca_file.display(),
        );
        // postgresql.auto.conf is read last: our settings win, and a restart rewrites them.
        std::fs::write(self.data.join("postgresql.auto.conf"), conf)
            .expect("write postgresql.auto.conf");
    }

    fn start_on_free_port(&mut self, opts: &PostgresOptions) {
        for _attempt in 0..5 {
            self.port = free_port();
            self.write_server_conf(opts);
            let mut cmd = self.as_postgres("postgres");
            cmd.arg("-D").arg(&self.data);
            self.server = Some(Proc::spawn("postgres", cmd, self.dir.path()));
            let ready = wait_until(START_TIMEOUT, "postgres accepts connections", || {
                if !self.server.as_mut().is_some_and(Proc::is_running) {
                    return Some(false);
                }
                self.is_ready().then_some(true)
            });
            if ready {
                return;
            }
            if !self.log().contains("could not bind IPv4 address") {
                fail_with_logs("postgres exited during startup", &[&*self]);
            }
        }
        fail_with_logs("postgres: no free port after 5 attempts", &[&*self]);
    }

    fn is_ready(&self) -> bool {
        Command::new(self.bin.join("pg_isready"))
            .arg("-q")
            .arg("-h")
            .arg(&self.socket_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Runs SQL as the superuser over the Unix socket; stdout (unaligned, tuples only).
    pub fn admin_sql(&self, sql: &str) -> String {
        let out = self
            .as_postgres("psql")
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-U", "postgres"])
            .args(["-d", "postgres", "-h"])
            .arg(&self.socket_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg(sql)
            .output()
            .expect("run psql");
        success_stdout(&format!("psql (admin) {sql}"), &out)
    }

    /// The libpq connection string of a TLS client: `host=localhost` (what verify-full
    /// checks the server certificate against), `hostaddr=127.0.0.1`.
    pub fn conninfo(&self, tls: &ClientTls, user: &str) -> String {
        format!(
            "host=localhost hostaddr=127.0.0.1 port={port} dbname=postgres user={user} \
             sslmode=verify-full sslrootcert={root} sslcert={cert} sslkey={key} \
             connect_timeout=10",
            port = self.port,
            root = tls.root.display(),
            cert = tls.cert.display(),
            key = tls.key.display(),
        )
    }

    /// One `psql -c <sql>` over TLS as `user`, no password ever (`-w`): `Ok(stdout)` or
    /// `Err(stderr)`.
    pub fn psql(&self, tls: &ClientTls, user: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-A", "-t", "-w", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.conninfo(tls, user))
            .arg("-c")
            .arg(sql)
            .stdin(Stdio::null())
            .output()
            .expect("run psql");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// A psql kept running: one connection, queried repeatedly.
    pub fn session(&self, tls: &ClientTls, user: &str) -> PsqlSession {
        PsqlSession::start(&self.bin, &self.conninfo(tls, user), self.dir.path())
    }

    /// `pg_ctl reload`: the server re-reads its config, certificate, key and CA file.
    pub fn reload(&self) {
        let out = self
            .as_postgres("pg_ctl")
            .arg("reload")
            .arg("-D")
            .arg(&self.data)
            .output()
            .expect("run pg_ctl");
        success_stdout("pg_ctl reload", &out);
    }
}

impl LogSource for Postgres {
    fn log_files(&self) -> Vec<Arc<LogFiles>> {
        self.server.iter().flat_map(LogSource::log_files).collect()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGINT is PostgreSQL's fast shutdown (SIGTERM waits for every client to leave).
        if let Some(server) = self.server.as_mut() {
            server.signal(Signal::SIGINT);
            let start = Instant::now();
            while server.is_running() && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!(
                "postgres: data dir and log kept in {}",
                self.dir.path().display()
            );
        }
    }
}

/// A running `psql` with its stdin piped: queries go over one connection.
pub struct PsqlSession {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: PathBuf,
    next: u64,
}

impl PsqlSession {
    fn start(bin: &Path, conninfo: &str, log_dir: &Path) -> PsqlSession {
        let stderr = tempfile::Builder::new()
            .prefix("psql-session-")
            .suffix(".stderr.log")
            .tempfile_in(log_dir)
            .expect("psql stderr file");
        let (file, stderr) = stderr.keep().expect("keep psql stderr file");
        let mut child = Command::new(bin.join("psql"))
            .args(["-X", "-A", "-t", "-q", "-w", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(conninfo)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(file)
            .spawn()
            .expect("start psql");
        let stdout = child.stdout.take().expect("psql stdout");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        PsqlSession {
            stdin: child.stdin.take(),
            child,
            lines,
            stderr,
            next: 0,
        }
    }

    /// Runs one statement; `Ok(output)` or `Err(psql's stderr)` when the session is gone.
    pub fn query(&mut self, sql: &str) -> Result<String, String> {
        self.next += 1;
        let marker = format!("--end-of-query-{}--", self.next);
        let stdin = self.stdin.as_mut().expect("psql stdin");
        if writeln!(stdin, "{sql};\n\\echo {marker}")
            .and_then(|()| stdin.flush())
            .is_err()
        {
            return Err(self.stderr());
        }
        let deadline = Instant::now() + QUERY_TIMEOUT;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line == marker => return Ok(out.join("\n")),
                Ok(line) => out.push(line),
                Err(RecvTimeoutError::Disconnected) => return Err(self.stderr()),
                Err(RecvTimeoutError::Timeout) => {
                    panic!("psql session: no answer to {sql:?} in {QUERY_TIMEOUT:?}")
                }
            }
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The psql process (its connection's server process is a child of the postmaster).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for PsqlSession {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}
