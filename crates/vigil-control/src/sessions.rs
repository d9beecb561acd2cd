//! Sessions the proxies report over the stream, recorded in the store so admins can
//! list and revoke them. A report is queued and written by one task, off the
//! stream; activity on a known session is written at most once a minute, so a busy
//! session costs one write a minute however many requests it makes.

use std::time::Duration;

use tokio::sync::mpsc;
use vigil_proto::v1::SessionReport;
use vigil_store::Op;

use crate::resources::{Resource as _, Session, SessionSpec, User, UserSpec, UserStatus};
use crate::time::{self, from_unix};
use crate::Control;

/// Reports waiting to be written; beyond this, new ones are dropped (and counted in
/// the log): the proxies report activity again later.
const QUEUE: usize = 10_000;
/// Activity closer than this to the last recorded is not written.
const ACTIVITY_EVERY: Duration = Duration::from_secs(60);

/// One report and the proxy it came from.
pub(crate) type Report = (String, SessionReport);

/// The queue the stream hands reports to.
pub(crate) fn queue() -> (mpsc::Sender<Report>, mpsc::Receiver<Report>) {
    mpsc::channel(QUEUE)
}

/// Whether `id` can be a session id: what a proxy mints (`ses_` and letters, digits).
fn valid_id(id: &str) -> bool {
    id.len() <= 100
        && id
            .strip_prefix("ses_")
            .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Checks a report's shape; the reason when it cannot be recorded.
fn check(r: &SessionReport) -> Result<(), &'static str> {
    if !valid_id(&r.session_id) {
        return Err("session_id must be `ses_` followed by 1 to 96 letters or digits");
    }
    if r.user_id.is_empty() || r.user_id.len() > 200 {
        return Err("user_id must be 1 to 200 characters");
    }
    if r.expires_at <= r.auth_time
        || from_unix(r.auth_time).is_none()
        || from_unix(r.expires_at).is_none()
    {
        return Err("auth_time and expires_at must be Unix times, auth_time first");
    }
    Ok(())
}

/// Writes queued reports until the queue closes.
pub(crate) async fn run(control: Control, mut rx: mpsc::Receiver<Report>) {
    while let Some((proxy, report)) = rx.recv().await {
        if let Err(why) = check(&report) {
            tracing::warn!(proxy = %proxy, session = %report.session_id, why, "Ignored a session report");
            continue;
        }
        if let Err(e) = record(&control, &proxy, &report).await {
            tracing::warn!(proxy = %proxy, session = %report.session_id, error = %e, "Cannot record a session report");
        }
    }
}

/// The user a sign-in names, when the directory does not have it yet and the report
/// says who it is (just-in-time provisioning): created under the id every proxy
/// derives from (issuer, subject), never under any other.
async fn provision(control: &Control, r: &SessionReport) -> Result<Option<Op>, String> {
    if r.issuer.is_empty() || r.subject.is_empty() {
        return Ok(None);
    }
    if control
        .store
        .get(User::KIND, &r.user_id)
        .await
        .map_err(|e| e.to_string())?
        .is_some()
    {
        return Ok(None);
    }
    if vigil_snapshot::provisioned_user_id(&r.issuer, &r.subject) != r.user_id {
        return Err(format!(
            "user `{}` is not in the directory and is not the id derived from its issuer and subject",
            r.user_id
        ));
    }
    let spec = UserSpec {
        issuer: r.issuer.clone(),
        subject: r.subject.clone(),
        email: r.email.clone(),
        email_verified: r.email_verified,
        display_name: r.display_name.clone(),
        status: UserStatus::Active,
        groups: Vec::new(),
        attributes: serde_json::Map::new(),
    };
    // The provider's claims are its own: an email or a name the directory would
    // refuse from an admin must not keep the user, and with it the session and
    // its sign-out, out of the directory. Each is left out on its own if need be.
    let mut refused = None;
    let mut entity = None;
    for (email, name) in [(true, true), (true, false), (false, true), (false, false)] {
        // Leaving out what is not there changes nothing: not tried again.
        if (!email && spec.email.is_none()) || (!name && spec.display_name.is_none()) {
            continue;
        }
        let candidate = UserSpec {
            email: spec.email.clone().filter(|_| email),
            email_verified: spec.email_verified && email,
            display_name: spec.display_name.clone().filter(|_| name),
            ..spec.clone()
        };
        match crate::api::prepare::<User>(control, candidate, &r.user_id, false).await {
            Ok((e, _)) => {
                entity = Some(e);
                break;
            }
            Err(p) => {
                refused.get_or_insert(p.detail);
            }
        }
    }
    let entity = entity.ok_or_else(|| refused.clone().unwrap_or_default())?;
    if let Some(why) = refused {
        tracing::warn!(user = %r.user_id, error = %why, "A new user's email or name from its identity provider is not valid here; the user is added without it");
    }
    Ok(Some(Op::Create(entity)))
}

/// The session's refresh token as stored: sealed with the secret-at-rest key (in
/// the entity's secret column, never in its document). `None` without a key: the
/// session is then never re-verified, which is said once in the log.
fn keep_refresh_token(control: &Control, token: &str, at: i64) -> Option<String> {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let sealed = crate::verifier::Held::new(token.to_owned(), at).seal(control);
    if sealed.is_none() && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            "No secret key configured (VIGIL_SECRET_KEY): refresh tokens from sign-ins are not stored, so sessions are not re-verified with their identity provider"
        );
    }
    sealed
}

/// Creates the session (and its user, when new), records its activity, or its
/// sign-out; never undoes a revocation.
async fn record(control: &Control, proxy: &str, r: &SessionReport) -> Result<(), String> {
    let actor = format!("proxy:{proxy}");
    let last_seen = from_unix(r.last_seen_at.max(r.auth_time));
    let revoked_at = r.signed_out.then(|| from_unix(r.last_seen_at)).flatten();
    let existing = control
        .store
        .get(Session::KIND, &r.session_id)
        .await
        .map_err(|e| e.to_string())?;
    let mut ops = Vec::new();
    let op = match existing {
        None => {
            let spec = SessionSpec {
                user_id: r.user_id.clone(),
                device_id: r.device_id.clone(),
                identity_provider: r.identity_provider.clone(),
                auth_time: from_unix(r.auth_time).unwrap_or_default(),
                expires_at: from_unix(r.expires_at).unwrap_or_default(),
                amr: r.amr.clone(),
                revoked_at,
                last_seen_at: last_seen,
            };
            ops.extend(provision(control, r).await?);
            let (mut entity, _) =
                crate::api::prepare::<Session>(control, spec, &r.session_id, false)
                    .await
                    .map_err(|p| p.detail)?;
            if !r.refresh_token.is_empty() && !r.signed_out {
                entity.secret = keep_refresh_token(control, &r.refresh_token, r.auth_time);
            }
            Op::Create(entity)
        }
        Some(rec) => {
            let mut spec = crate::api::stored::<Session>(rec.body).map_err(|p| p.detail)?;
            if spec.user_id != r.user_id {
                return Err(format!(
                    "the session belongs to `{}`, not `{}`",
                    spec.user_id, r.user_id
                ));
            }
            let recorded = spec
                .last_seen_at
                .as_deref()
                .and_then(time::unix)
                .unwrap_or(0);
            let due = r.last_seen_at.saturating_sub(recorded) >= ACTIVITY_EVERY.as_secs() as i64;
            if spec.revoked_at.is_some() || !(due || r.signed_out) {
                return Ok(());
            }
            spec.last_seen_at = last_seen;
            if r.signed_out {
                spec.revoked_at = revoked_at;
            }
            crate::api::replace_op::<Session>(control, &r.session_id, spec, Some(rec.version))
                .await
                .map_err(|p| p.detail)?
        }
    };
    ops.push(op);
    let action = if r.signed_out { "sign-out" } else { "report" };
    control
        .write(&actor, Some(action), ops)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> SessionReport {
        SessionReport {
            session_id: "ses_0123abc".into(),
            user_id: "usr_1".into(),
            auth_time: 1_700_000_000,
            expires_at: 1_700_003_600,
            last_seen_at: 1_700_000_010,
            ..SessionReport::default()
        }
    }

    #[test]
    fn reports_are_checked() {
        assert!(check(&report()).is_ok());
        for id in [
            "",
            "ses_",
            "abc",
            "ses_a/b",
            "ses_ä",
            &format!("ses_{}", "a".repeat(97)),
        ] {
            let r = SessionReport {
                session_id: id.into(),
                ..report()
            };
            assert!(check(&r).is_err(), "{id}");
        }
        let r = SessionReport {
            user_id: String::new(),
            ..report()
        };
        assert!(check(&r).is_err());
        let r = SessionReport {
            expires_at: 1_600_000_000,
            ..report()
        };
        assert!(check(&r).is_err());
        let r = SessionReport {
            auth_time: i64::MIN,
            ..report()
        };
        assert!(check(&r).is_err());
    }
}
