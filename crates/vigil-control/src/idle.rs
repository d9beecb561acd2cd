//! Idle timeout: a session nobody has used for longer than the timeout is
//! revoked, like an admin revocation, and every proxy denies it at its next
//! snapshot.
//!
//! The control plane decides, not the proxies: a user active on one proxy and
//! idle on another is active, and only the control plane sees the activity of
//! the whole fleet (proxies report a session's use at most once a minute, so
//! the timeout is at least [`MIN_IDLE`]). Several replicas may sweep at once:
//! each revocation is a conditional write, so one wins and the others skip.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::api::{replace_op, stored};
use crate::resources::{list_all, Resource as _, Session, SessionSpec};
use crate::time;
use crate::Control;

/// The shortest idle timeout: activity is reported at most once a minute.
pub const MIN_IDLE: Duration = Duration::from_secs(300);

/// When `spec`'s session was last used (its sign-in when never reported).
fn last_used(spec: &SessionSpec) -> Option<DateTime<Utc>> {
    let seen = spec.last_seen_at.as_deref().and_then(time::parse);
    let auth = time::parse(&spec.auth_time);
    seen.max(auth)
}

/// Whether `spec` is live and has been idle longer than `idle` at `now`.
pub fn is_idle(spec: &SessionSpec, idle: Duration, now: DateTime<Utc>) -> bool {
    if spec.revoked_at.is_some() || time::parse(&spec.expires_at).is_none_or(|e| e <= now) {
        return false;
    }
    let Ok(idle) = chrono::Duration::from_std(idle) else {
        return false;
    };
    last_used(spec).is_some_and(|t| now - t > idle)
}

/// Revokes every session idle longer than `idle`, once; how many.
pub async fn sweep(control: &Control, idle: Duration) -> usize {
    let records = match list_all(&control.store, Session::KIND, Vec::new()).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "Idle sweep: listing sessions failed; trying again later");
            return 0;
        }
    };
    let now = Utc::now();
    let mut revoked = 0;
    for rec in records {
        let Ok(mut spec) = stored::<Session>(rec.body) else {
            continue;
        };
        if !is_idle(&spec, idle, now) {
            continue;
        }
        let user = spec.user_id.clone();
        spec.revoked_at = Some(time::secs(now));
        let Ok(op) = replace_op::<Session>(control, &rec.id, spec, Some(rec.version)).await else {
            continue;
        };
        // A conflict means someone else wrote it first (activity, another replica): skip.
        if control
            .write("idle-timeout", Some("idle"), vec![op])
            .await
            .is_ok()
        {
            tracing::info!(session = %rec.id, user = %user, "Session revoked: idle for longer than the timeout");
            revoked += 1;
        }
    }
    revoked
}

/// Sweeps every quarter of `idle` (at most a minute apart) until the process ends.
pub async fn run(control: Control, idle: Duration) {
    let idle = idle.max(MIN_IDLE);
    let every = (idle / 4).min(Duration::from_secs(60));
    loop {
        sweep(&control, idle).await;
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn session(auth: &str, seen: Option<&str>, expires: &str, revoked: bool) -> SessionSpec {
        serde_json::from_value(serde_json::json!({
            "user_id": "usr_1",
            "auth_time": auth,
            "expires_at": expires,
            "last_seen_at": seen,
            "revoked_at": revoked.then_some("2030-01-01T00:00:00Z"),
        }))
        .unwrap()
    }

    #[test]
    fn idle_means_unused_for_longer_than_the_timeout() {
        let now = time::parse("2030-01-01T12:00:00Z").unwrap();
        let hour = Duration::from_secs(3600);
        let s = |auth, seen| session(auth, seen, "2030-01-02T00:00:00Z", false);
        assert!(is_idle(&s("2030-01-01T10:00:00Z", None), hour, now));
        assert!(!is_idle(
            &s("2030-01-01T10:00:00Z", Some("2030-01-01T11:30:00Z")),
            hour,
            now
        ));
        assert!(is_idle(
            &s("2030-01-01T09:00:00Z", Some("2030-01-01T10:59:00Z")),
            hour,
            now
        ));
        assert!(!is_idle(&s("2030-01-01T11:10:00Z", None), hour, now));
        // Revoked or expired sessions are left alone.
        let revoked = session("2030-01-01T01:00:00Z", None, "2030-01-02T00:00:00Z", true);
        assert!(!is_idle(&revoked, hour, now));
        let expired = session("2030-01-01T01:00:00Z", None, "2030-01-01T02:00:00Z", false);
        assert!(!is_idle(&expired, hour, now));
    }
}
