//! Child processes with their output in files, killed on drop, and polling helpers that
//! show those logs when a wait times out.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long a process gets between SIGTERM and SIGKILL.
pub const STOP_DEADLINE: Duration = Duration::from_secs(10);
/// Lines of each stream shown when a test fails.
const TAIL_LINES: usize = 80;

/// Where one process's output goes.
#[derive(Debug)]
pub struct LogFiles {
    pub name: String,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    /// Set once the tails were printed, so a failure prints them once.
    dumped: AtomicBool,
}

impl LogFiles {
    /// Both streams whole.
    pub fn read(&self) -> String {
        format!("{}{}", read_lossy(&self.stdout), read_lossy(&self.stderr))
    }

    /// The last `lines` lines of each stream, labelled.
    pub fn tail(&self, lines: usize) -> String {
        let mut out = String::new();
        for (stream, path) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            let text = read_lossy(path);
            let all: Vec<&str> = text.lines().collect();
            let shown = &all[all.len().saturating_sub(lines)..];
            out.push_str(&format!(
                "----- {} {stream} ({}, last {} of {} lines) -----\n",
                self.name,
                path.display(),
                shown.len(),
                all.len()
            ));
            for line in shown {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

thread_local! {
    /// Processes started on this thread, for [`wait_until`]'s timeout message.
    static STARTED_HERE: RefCell<Vec<Weak<LogFiles>>> = const { RefCell::new(Vec::new()) };
}

/// Anything whose process logs are worth showing when a test fails.
pub trait LogSource {
    fn log_files(&self) -> Vec<Arc<LogFiles>>;

    /// The tails of all its logs.
    fn log_tails(&self) -> String {
        self.log_files()
            .iter()
            .map(|l| l.tail(TAIL_LINES))
            .collect()
    }
}

/// A child process whose stdout/stderr go to `<log_dir>/<name>.{stdout,stderr}.log`
/// (appended, so a restarted process keeps one file). On drop: SIGTERM, SIGKILL after
/// [`STOP_DEADLINE`], and when the thread is panicking the logs' tails go to stderr.
pub struct Proc {
    child: Option<Child>,
    logs: Arc<LogFiles>,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd` (stdin: null). Panics when it cannot start.
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> Proc {
        let stdout = log_dir.join(format!("{name}.stdout.log"));
        let stderr = log_dir.join(format!("{name}.stderr.log"));
        let open = |path: &Path| -> File {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .unwrap_or_else(|e| panic!("open log {}: {e}", path.display()))
        };
        let out = open(&stdout);
        let mut err = open(&stderr);
        let _ = writeln!(err, "===== harness: starting {name}: {cmd:?}");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        let logs = Arc::new(LogFiles {
            name: name.to_string(),
            stdout,
            stderr,
            dumped: AtomicBool::new(false),
        });
        STARTED_HERE.with(|s| {
            let mut s = s.borrow_mut();
            s.retain(|w| w.strong_count() > 0);
            s.push(Arc::downgrade(&logs));
        });
        Proc {
            child: Some(child),
            logs,
            status: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.logs.name
    }

    /// The PID (also after exit: the last one it had).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// `None` while running, the exit status once it exited (reaped).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none()
            && let Some(child) = self.child.as_mut()
        {
            self.status = child.try_wait().expect("try_wait");
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Sends a signal (no-op once it exited).
    pub fn signal(&mut self, signal: Signal) {
        if self.is_running() {
            let _ = kill(Pid::from_raw(self.pid() as i32), signal);
        }
    }

    /// SIGTERM, wait up to `deadline`, then SIGKILL; returns the exit status.
    pub fn stop_within(&mut self, deadline: Duration) -> Option<ExitStatus> {
        self.signal(Signal::SIGTERM);
        let start = Instant::now();
        while self.is_running() && start.elapsed() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill()
    }

    /// SIGTERM, SIGKILL after [`STOP_DEADLINE`].
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.stop_within(STOP_DEADLINE)
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if self.is_running()
            && let Some(child) = self.child.as_mut()
        {
            let _ = child.kill();
            self.status = child.wait().ok();
        }
        self.status
    }

    /// Both streams, whole.
    pub fn logs(&self) -> String {
        self.logs.read()
    }

    pub fn log_paths(&self) -> (&Path, &Path) {
        (&self.logs.stdout, &self.logs.stderr)
    }
}

impl LogSource for Proc {
    fn log_files(&self) -> Vec<Arc<LogFiles>> {
        vec![self.logs.clone()]
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() && !self.logs.dumped.swap(true, Ordering::SeqCst) {
            eprintln!("{}", self.logs.tail(TAIL_LINES));
        }
    }
}

/// Polls `f` (short, growing interval, up to 200 ms) until it returns `Some`. On timeout
/// panics with `description` and the log tails of the processes started on this thread
/// that are still alive.
pub fn wait_until<T>(timeout: Duration, description: &str, f: impl FnMut() -> Option<T>) -> T {
    wait_until_with(timeout, description, &[], f)
}

/// [`wait_until`], also showing the logs of `sources` on timeout (use it when the processes
/// were started on another thread).
pub fn wait_until_with<T>(
    timeout: Duration,
    description: &str,
    sources: &[&dyn LogSource],
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    let mut interval = Duration::from_millis(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() >= timeout {
            timed_out(timeout, description, sources);
        }
        std::thread::sleep(interval);
        interval = (interval * 2).min(Duration::from_millis(200));
    }
}

/// [`wait_until`] for async tests: sleeps with tokio, so the runtime keeps running.
pub async fn wait_until_async<T, F, Fut>(timeout: Duration, description: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    let mut interval = Duration::from_millis(10);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() >= timeout {
            timed_out(timeout, description, &[]);
        }
        tokio::time::sleep(interval).await;
        interval = (interval * 2).min(Duration::from_millis(200));
    }
}

fn timed_out(timeout: Duration, description: &str, sources: &[&dyn LogSource]) -> ! {
    fail_with_logs(
        &format!("timed out after {timeout:?} waiting until {description}"),
        sources,
    )
}

/// Panics with `message`, then the log tails of `sources` and of the processes started on
/// this thread that are still alive (each shown once).
pub fn fail_with_logs(message: &str, sources: &[&dyn LogSource]) -> ! {
    let mut files: Vec<Arc<LogFiles>> = sources.iter().flat_map(|s| s.log_files()).collect();
    STARTED_HERE.with(|s| {
        for w in s.borrow().iter() {
            if let Some(l) = w.upgrade()
                && !files.iter().any(|f| Arc::ptr_eq(f, &l))
            {
                files.push(l);
            }
        }
    });
    let mut msg = format!("{message}\n");
    for l in &files {
        l.dumped.store(true, Ordering::SeqCst);
        msg.push_str(&l.tail(TAIL_LINES));
    }
    panic!("{msg}");
}

/// The stdout of a command that must have succeeded; otherwise panics with `what`, its
/// status, stdout and stderr.
pub fn success_stdout(what: &str, out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what}: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
