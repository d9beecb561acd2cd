//! The admin API's resource kinds as vigilctl names them: one table drives the
//! subcommands, `apply`'s `kind` field and the list tables.

/// A column of a kind's list table.
#[derive(Debug)]
pub struct Column {
    /// Header, upper case.
    pub header: &'static str,
    /// JSON Pointer of the value in a resource.
    pub pointer: &'static str,
}

const fn col(header: &'static str, pointer: &'static str) -> Column {
    Column { header, pointer }
}

/// How `apply` finds the stored resource a document describes.
#[derive(Debug, PartialEq, Eq)]
pub enum Identity {
    /// The `name` is the id.
    Name,
    /// These top-level fields are a unique key the list endpoint filters on.
    NaturalKey(&'static [&'static str]),
    /// Only an explicit `id`; without one, `apply` creates.
    Id,
}

/// One kind of resource of the API.
#[derive(Debug)]
pub struct Kind {
    /// URL segment under `/v1/`, also the subcommand.
    pub path: &'static str,
    /// One of these, in words joined by `-` (also accepted as a name).
    pub singular: &'static str,
    /// The store's name, used by the audit trail's `kind` filter.
    pub store_kind: &'static str,
    /// Other accepted names.
    pub aliases: &'static [&'static str],
    /// How `apply` finds an existing one.
    pub identity: Identity,
    /// Actions beyond CRUD, by subcommand name (see [`crate::cli::Action`]).
    pub actions: &'static [&'static str],
    /// Position in `apply`: a kind comes after the kinds it can refer to.
    pub apply_rank: u8,
    /// The list table.
    pub columns: &'static [Column],
    /// One line for `--help`.
    pub about: &'static str,
}

const VERSION: Column = col("VERSION", "/version");
const UPDATED: Column = col("UPDATED", "/updated_at");
/// The SHA-256 of the public key of a device's or service account's client
/// certificate (mTLS).
const CERTIFICATE: Column = col("CERT SHA-256", "/client_certificate_sha256");

/// Every kind, in the API's order.
pub static KINDS: &[Kind] = &[
    Kind {
        path: "policies",
        singular: "policy",
        store_kind: "policy",
        aliases: &[],
        identity: Identity::Name,
        actions: &["validate"],
        apply_rank: 1,
        columns: &[
            col("NAME", "/name"),
            col("DESCRIPTION", "/description"),
            VERSION,
            UPDATED,
        ],
        about: "Named, reusable policies",
    },
    Kind {
        path: "routes",
        singular: "route",
        store_kind: "route",
        aliases: &[],
        identity: Identity::Name,
        actions: &[],
        apply_rank: 3,
        columns: &[
            col("NAME", "/name"),
            col("HOST", "/host"),
            col("PATH", "/path"),
            col("UPSTREAMS", "/upstreams"),
            col("POLICIES", "/policies"),
            VERSION,
            UPDATED,
        ],
        about: "Protected applications: host, path, upstreams and policies",
    },
    Kind {
        path: "users",
        singular: "user",
        store_kind: "user",
        aliases: &[],
        identity: Identity::NaturalKey(&["issuer", "subject"]),
        actions: &["revoke-sessions"],
        apply_rank: 4,
        columns: &[
            col("ID", "/id"),
            col("EMAIL", "/email"),
            col("STATUS", "/status"),
            col("GROUPS", "/groups"),
            VERSION,
            UPDATED,
        ],
        about: "People, as known from identity providers",
    },
    Kind {
        path: "groups",
        singular: "group",
        store_kind: "group",
        aliases: &[],
        identity: Identity::Name,
        actions: &[],
        apply_rank: 0,
        columns: &[
            col("NAME", "/name"),
            col("DESCRIPTION", "/description"),
            VERSION,
            UPDATED,
        ],
        about: "Local groups of users",
    },
    Kind {
        path: "devices",
        singular: "device",
        store_kind: "device",
        aliases: &[],
        identity: Identity::Id,
        actions: &[],
        apply_rank: 6,
        columns: &[
            col("ID", "/id"),
            col("NAME", "/name"),
            col("OWNER", "/owner"),
            col("APPROVED", "/approved"),
            col("REVOKED", "/revoked"),
            CERTIFICATE,
            VERSION,
        ],
        about: "Devices, their approval and posture",
    },
    Kind {
        path: "service-accounts",
        singular: "service-account",
        store_kind: "service_account",
        aliases: &["sa"],
        identity: Identity::Name,
        actions: &["rotate-token"],
        apply_rank: 5,
        columns: &[
            col("NAME", "/name"),
            col("GROUPS", "/groups"),
            col("EXPIRES", "/expires_at"),
            col("DISABLED", "/disabled"),
            CERTIFICATE,
            VERSION,
        ],
        about: "Non-human principals with bearer tokens",
    },
    Kind {
        path: "grants",
        singular: "grant",
        store_kind: "grant",
        aliases: &[],
        identity: Identity::Id,
        actions: &[],
        apply_rank: 7,
        columns: &[
            col("ID", "/id"),
            col("SUBJECT", "/subject"),
            col("ROUTE", "/route"),
            col("START", "/start"),
            col("END", "/end"),
            col("APPROVER", "/approver"),
        ],
        about: "Just-in-time access to a route",
    },
    Kind {
        path: "identity-providers",
        singular: "identity-provider",
        store_kind: "identity_provider",
        aliases: &["idp", "idps"],
        identity: Identity::Name,
        actions: &[],
        apply_rank: 2,
        columns: &[
            col("NAME", "/name"),
            col("ISSUER", "/issuer_url"),
            col("CLIENT ID", "/client_id"),
            col("SECRET SET", "/client_secret_set"),
            VERSION,
        ],
        about: "OpenID Connect providers users sign in with",
    },
    Kind {
        path: "sessions",
        singular: "session",
        store_kind: "session",
        aliases: &[],
        identity: Identity::Id,
        actions: &["revoke"],
        apply_rank: 8,
        columns: &[
            col("ID", "/id"),
            col("USER", "/user_id"),
            col("DEVICE", "/device_id"),
            col("EXPIRES", "/expires_at"),
            col("REVOKED", "/revoked_at"),
        ],
        about: "Signed-in sessions reported by proxies",
    },
    Kind {
        path: "join-tokens",
        singular: "join-token",
        store_kind: "join_token",
        aliases: &[],
        identity: Identity::Name,
        actions: &["rotate-token"],
        apply_rank: 9,
        columns: &[
            col("NAME", "/name"),
            col("DESCRIPTION", "/description"),
            col("EXPIRES", "/expires_at"),
            VERSION,
        ],
        about: "Tokens proxies join the fleet with",
    },
    Kind {
        path: "admin-tokens",
        singular: "admin-token",
        store_kind: "admin_token",
        aliases: &[],
        identity: Identity::Name,
        actions: &["rotate-token"],
        apply_rank: 10,
        columns: &[
            col("NAME", "/name"),
            col("ROLE", "/role"),
            col("EXPIRES", "/expires_at"),
            VERSION,
        ],
        about: "Bearer tokens for this API (owners only)",
    },
];

/// The kind called `name`: its path or singular (`policies`, `policy`), an
/// alias, or the store's name (`service_account`); case, `_` and spaces for
/// `-` do not matter.
pub fn resolve(name: &str) -> Option<&'static Kind> {
    let n: String = name
        .trim()
        .chars()
        .map(|c| match c {
            '_' | ' ' => '-',
            c => c.to_ascii_lowercase(),
        })
        .collect();
    KINDS
        .iter()
        .find(|k| k.path == n || k.singular == n || k.aliases.contains(&n.as_str()))
}

/// Every name [`resolve`] knows, for messages.
pub fn known() -> String {
    KINDS.iter().map(|k| k.path).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plural_singular_alias_and_store_names_resolve() {
        for (name, path) in [
            ("policies", "policies"),
            ("policy", "policies"),
            ("Policy", "policies"),
            ("route", "routes"),
            ("service-accounts", "service-accounts"),
            ("service-account", "service-accounts"),
            ("service_account", "service-accounts"),
            ("service account", "service-accounts"),
            ("sa", "service-accounts"),
            ("idp", "identity-providers"),
            ("identity_provider", "identity-providers"),
            ("join-token", "join-tokens"),
            ("admin_tokens", "admin-tokens"),
            (" users ", "users"),
        ] {
            assert_eq!(resolve(name).map(|k| k.path), Some(path), "{name}");
        }
    }

    #[test]
    fn unknown_names_do_not_resolve() {
        for name in ["", "upstreams", "polic", "proxies", "audit", "config"] {
            assert!(resolve(name).is_none(), "{name}");
        }
    }

    #[test]
    fn every_kind_resolves_by_each_of_its_names() {
        for k in KINDS {
            assert!(std::ptr::eq(resolve(k.path).unwrap(), k));
            assert!(std::ptr::eq(resolve(k.singular).unwrap(), k));
            assert!(std::ptr::eq(resolve(k.store_kind).unwrap(), k));
            for a in k.aliases {
                assert!(std::ptr::eq(resolve(a).unwrap(), k));
            }
        }
    }

    #[test]
    fn names_are_unique_and_apply_ranks_distinct() {
        let mut names: Vec<&str> = KINDS
            .iter()
            .flat_map(|k| {
                [k.path, k.singular]
                    .into_iter()
                    .chain(k.aliases.iter().copied())
            })
            .collect();
        let n = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), n);
        let mut ranks: Vec<u8> = KINDS.iter().map(|k| k.apply_rank).collect();
        ranks.sort();
        ranks.dedup();
        assert_eq!(ranks.len(), KINDS.len());
    }
}
