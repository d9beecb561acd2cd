//! What the request path reads: the snapshot with every route's policy loaded and
//! linked into one symbol table. Built off the request path, swapped in whole.

use std::sync::Arc;

use vigil_policy::{CompiledPolicy, Symbols};
use vigil_proto::v1::entry::Body;
use vigil_snapshot::{Kind, Snapshot, SnapshotError, Update};

use crate::routes::RouteTable;

/// One version of everything the proxy enforces.
#[derive(Debug, Clone, Default)]
pub struct Index {
    /// The entries, as the control plane sent them.
    pub snapshot: Arc<Snapshot>,
    /// Names the policies mention, shared by every route's policy.
    pub symbols: Arc<Symbols>,
    /// Each route's loaded policy, by route name (a persistent map: an update copies
    /// only the paths it touches).
    pub policies: imbl::OrdMap<String, Arc<CompiledPolicy>>,
    /// Which route serves a (host, path); rebuilt only when routes change.
    pub routes: Arc<RouteTable>,
}

impl Index {
    /// The version held (0: none).
    pub fn version(&self) -> u64 {
        self.snapshot.version
    }

    /// The route serving a request: its id and policy. `host` and `path` are
    /// canonical ([`crate::routes::canonical_host`], [`crate::normalize::normalize_path`]).
    pub fn route(&self, host: &str, path: &str) -> Option<(&str, &CompiledPolicy)> {
        let id = self.routes.find(host, path)?;
        Some((id, self.policy(id)?))
    }

    /// The policy of a route.
    pub fn policy(&self, route: &str) -> Option<&CompiledPolicy> {
        self.policies.get(route).map(|p| &**p)
    }

    /// The index after `update`, leaving `self` untouched: the snapshot is a persistent
    /// map, so only what the update touches is copied. Every check (each changed
    /// route's policy, the update's shape and base version) passes before the result
    /// exists, so a bad update changes nothing. Unchanged routes keep their policies.
    pub fn apply(&self, update: Update) -> Result<Index, SnapshotError> {
        let (mut symbols, mut policies) = if update.full {
            (Arc::new(Symbols::default()), imbl::OrdMap::new())
        } else {
            (self.symbols.clone(), self.policies.clone())
        };
        let mut routes_changed = update.full;
        for removed in &update.removals {
            if removed.kind == Kind::Route as i32 {
                policies.remove(&removed.id);
                routes_changed = true;
            }
        }
        for entry in &update.upserts {
            if let Some(Body::Route(route)) = &entry.body {
                // Copies the symbol table only when a route changes (and then once).
                let policy =
                    vigil_snapshot::decode_policy(&route.policy, Arc::make_mut(&mut symbols))
                        .map_err(|e| {
                            SnapshotError::Invalid(format!("route `{}`: {e}", entry.id))
                        })?;
                policies.insert(entry.id.clone(), Arc::new(policy));
                routes_changed = true;
            }
        }
        let mut snapshot = (*self.snapshot).clone();
        snapshot.apply(update)?;
        let routes = if routes_changed {
            Arc::new(RouteTable::build(&snapshot))
        } else {
            self.routes.clone()
        };
        Ok(Index {
            snapshot: Arc::new(snapshot),
            symbols,
            policies,
            routes,
        })
    }
}
