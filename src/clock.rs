//! Wall-clock time, behind a trait so that code judging certificate expiry can be run on
//! tokio's virtual time in tests. A leaf: it imports no other module of the crate.

use std::fmt;
use std::sync::Arc;

/// Unix seconds now. Certificate validity is wall-clock time, so production reads the
/// system clock (and follows it when NTP steps it); tests use [`TokioClock`].
pub trait Clock: fmt::Debug + Send + Sync + 'static {
    fn unix_now(&self) -> i64;
}

/// A shared clock, as the cache and its supervisors hold it.
pub type SharedClock = Arc<dyn Clock>;

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn unix_now(&self) -> i64 {
        unix_now()
    }
}

/// The system clock's reading when created, advanced by tokio's clock since then: with
/// `tokio::time::pause`, certificates expire on virtual time, in step with the timers.
#[derive(Clone, Copy)]
pub struct TokioClock {
    unix_at_start: i64,
    start: tokio::time::Instant,
}

impl TokioClock {
    pub fn new() -> Self {
        Self {
            unix_at_start: unix_now(),
            start: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for TokioClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokioClock")
            .field("unix_now", &self.unix_now())
            .finish()
    }
}

impl Clock for TokioClock {
    fn unix_now(&self) -> i64 {
        let elapsed = i64::try_from(self.start.elapsed().as_secs()).unwrap_or(i64::MAX);
        self.unix_at_start.saturating_add(elapsed)
    }
}

/// Unix seconds from the system clock; 0 before 1970, which no certificate is valid at.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
