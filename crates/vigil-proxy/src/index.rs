//! What the request path reads: the snapshot with every route's policy loaded and
//! linked into one symbol table. Built off the request path, swapped in whole.

use std::collections::HashMap;
use std::sync::Arc;

use vigil_policy::{CompiledPolicy, Symbols};
use vigil_proto::v1::entry::Body;
use vigil_snapshot::{Key, Kind, Snapshot, SnapshotError, Update};

/// One version of everything the proxy enforces.
#[derive(Debug, Clone, Default)]
pub struct Index {
    /// The entries, as the control plane sent them.
    pub snapshot: Arc<Snapshot>,
    /// Names the policies mention, shared by every route's policy.
    pub symbols: Arc<Symbols>,
    /// Each route's loaded policy, by route name.
    pub policies: HashMap<String, Arc<CompiledPolicy>>,
}

impl Index {
    /// The version held (0: none).
    pub fn version(&self) -> u64 {
        self.snapshot.version
    }

    /// The policy of a route.
    pub fn policy(&self, route: &str) -> Option<&CompiledPolicy> {
        self.policies.get(route).map(|p| &**p)
    }

    /// The index after `update`, leaving `self` untouched. Every check (shape, base
    /// version, every changed route's policy) passes before anything is built, so a
    /// bad update changes nothing. Unchanged routes keep their loaded policies.
    pub fn apply(&self, update: Update) -> Result<Index, SnapshotError> {
        let full = update.full;
        let changed_routes: Vec<Key> = update
            .upserts
            .iter()
            .filter_map(Key::of)
            .filter(|k| k.kind == Kind::Route)
            .collect();
        let mut snapshot = if full {
            Snapshot::default()
        } else {
            (*self.snapshot).clone()
        };
        snapshot.apply(update)?;
        let (mut symbols, mut policies) = if full {
            (Symbols::default(), HashMap::new())
        } else {
            ((*self.symbols).clone(), self.policies.clone())
        };
        policies.retain(|name, _| snapshot.get(Kind::Route, name).is_some());
        for key in changed_routes {
            let Some(Body::Route(route)) = snapshot
                .get(Kind::Route, &key.id)
                .and_then(|e| e.body.as_ref())
            else {
                continue;
            };
            let policy = vigil_snapshot::decode_policy(&route.policy, &mut symbols)
                .map_err(|e| SnapshotError::Invalid(format!("route `{}`: {e}", key.id)))?;
            policies.insert(key.id.clone(), Arc::new(policy));
        }
        Ok(Index {
            snapshot: Arc::new(snapshot),
            symbols: Arc::new(symbols),
            policies,
        })
    }
}
