//! Admin authentication: `Authorization: Bearer <token>`, a bootstrap owner token
//! from configuration, and admin tokens (stored hashed) with roles.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use crate::crypto::token_hash;
use crate::problem::Problem;
use crate::resources::{is_past, AdminToken, Resource, Role};
use crate::Control;
use vigil_proto::{sole_bearer, BearerError};

/// An authenticated admin.
#[derive(Debug, Clone)]
pub struct Admin {
    /// Who, for the audit trail: `bootstrap` or `admin-token:<name>`.
    pub actor: String,
    /// What they may do.
    pub role: Role,
}

impl Admin {
    /// 403 unless the admin has at least `role`.
    pub fn require(&self, role: Role) -> Result<(), Problem> {
        if self.role >= role {
            Ok(())
        } else {
            Err(Problem::forbidden(format!(
                "this needs the {} role; the token has {}",
                role.name(),
                self.role.name()
            )))
        }
    }
}

/// Constant-time comparison of two hashes.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl FromRequestParts<Control> for Admin {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, control: &Control) -> Result<Admin, Problem> {
        let token = sole_bearer(&parts.headers).map_err(|e| {
            Problem::unauthorized(match e {
                BearerError::NotOne => "send exactly one `Authorization: Bearer <token>` header",
                BearerError::Malformed => "malformed Authorization header",
                BearerError::NotBearer => "use `Authorization: Bearer <token>`",
            })
        })?;
        let hash = token_hash(token);
        if let Some(boot) = control.bootstrap_hash() {
            if same(&hash, boot) {
                return Ok(Admin {
                    actor: "bootstrap".into(),
                    role: Role::Owner,
                });
            }
        }
        let Some(rec) = control
            .store
            .find_by_secret(AdminToken::KIND, &hash)
            .await?
        else {
            return Err(Problem::unauthorized("unknown or revoked token"));
        };
        let spec = crate::api::stored::<AdminToken>(rec.body)?;
        if spec.expires_at.as_deref().is_some_and(is_past) {
            return Err(Problem::unauthorized("the token has expired"));
        }
        Ok(Admin {
            actor: format!("admin-token:{}", rec.id),
            role: spec.role,
        })
    }
}
