//! The proxy's clock for every policy, session, grant and token time check: the
//! system time plus an offset that is zero outside tests. TLS certificate validity
//! is not checked against it.
//!
//! Tests move the clock forward (`vigil proxy --test-clock-file`, hidden): a file
//! holding an offset in seconds, re-read every [`FOLLOW_EVERY`], so that a grant's
//! end or a session's expiry can be reached without waiting. Reading the clock costs
//! one atomic load on top of the system time.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How often a test clock file is read again.
pub const FOLLOW_EVERY: Duration = Duration::from_millis(100);

/// The system time plus an offset.
#[derive(Debug, Default)]
pub struct Clock {
    offset_s: AtomicI64,
}

/// The one clock of this process.
static CLOCK: Clock = Clock::new();

impl Clock {
    /// A clock at the system time.
    pub const fn new() -> Clock {
        Clock {
            offset_s: AtomicI64::new(0),
        }
    }

    /// Now, in Unix seconds.
    pub fn now(&self) -> i64 {
        system_now().saturating_add(self.offset_s.load(Ordering::Relaxed))
    }

    /// How far (seconds) this clock is from the system time.
    pub fn offset(&self) -> i64 {
        self.offset_s.load(Ordering::Relaxed)
    }

    /// Moves the clock `offset_s` seconds from the system time.
    pub fn set_offset(&self, offset_s: i64) {
        self.offset_s.store(offset_s, Ordering::Relaxed);
    }
}

fn system_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Now, in Unix seconds, by the proxy's clock.
pub fn now() -> i64 {
    CLOCK.now()
}

/// The proxy's clock.
pub fn global() -> &'static Clock {
    &CLOCK
}

/// The offset a test clock file holds: a whole number of seconds, surrounded by
/// white space or not. An empty file means no offset.
pub fn parse_offset(text: &str) -> Result<i64, String> {
    let t = text.trim();
    if t.is_empty() {
        return Ok(0);
    }
    t.parse::<i64>()
        .map_err(|_| format!("`{t}` is not a whole number of seconds"))
}

/// Makes the proxy's clock follow the offset in `path` (for tests only): read now
/// and then every [`FOLLOW_EVERY`] by a task of its own. A missing file means no
/// offset; a file that does not parse keeps the offset before it (and is logged).
/// Logs a warning at start, since the proxy then no longer keeps real time.
pub fn follow_file(path: PathBuf) -> tokio::task::JoinHandle<()> {
    tracing::warn!(
        file = %path.display(),
        "TEST CLOCK IN USE: policy, session, grant and token times follow the offset in this file; never run a deployment like this"
    );
    follow(&CLOCK, &path);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(FOLLOW_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            follow(&CLOCK, &path);
        }
    })
}

fn follow(clock: &Clock, path: &Path) {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "Test clock file not readable; keeping the offset");
            return;
        }
    };
    match parse_offset(&text) {
        Ok(offset) if offset != clock.offset() => {
            tracing::info!(offset_s = offset, "Test clock moved");
            clock.set_offset(offset);
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "Test clock file not understood; keeping the offset");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_offset_moves_the_clock_and_only_it() {
        let clock = Clock::new();
        let before = clock.now();
        clock.set_offset(86_400);
        let after = clock.now();
        assert!(
            (86_400..86_400 + 5).contains(&(after - before)),
            "{after} - {before}"
        );
        clock.set_offset(-60);
        assert!(clock.now() < before);
    }

    #[test]
    fn offsets_parse_strictly() {
        assert_eq!(parse_offset(" 3600\n"), Ok(3600));
        assert_eq!(parse_offset("-5"), Ok(-5));
        assert_eq!(parse_offset(""), Ok(0));
        assert!(parse_offset("1.5").is_err());
        assert!(parse_offset("1h").is_err());
    }

    #[test]
    fn a_file_sets_the_offset_and_a_bad_one_keeps_it() {
        let dir = std::env::temp_dir().join(format!("vigil-clock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("offset");
        let clock = Clock::new();
        follow(&clock, &file);
        assert_eq!(clock.offset(), 0);
        std::fs::write(&file, "7200").unwrap();
        follow(&clock, &file);
        assert_eq!(clock.offset(), 7200);
        std::fs::write(&file, "soon").unwrap();
        follow(&clock, &file);
        assert_eq!(clock.offset(), 7200);
        std::fs::remove_file(&file).unwrap();
        follow(&clock, &file);
        assert_eq!(clock.offset(), 0);
    }
}
