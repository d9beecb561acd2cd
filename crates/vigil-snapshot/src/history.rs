//! The control plane's view: the current snapshot and which keys changed at each
//! recent version, so a delta from any recent version can be built.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use crate::{Entry, Key, Snapshot, Update};

/// The current snapshot and a bounded log of the keys each version changed.
#[derive(Debug, Clone)]
pub struct History {
    current: Arc<Snapshot>,
    /// (version, keys changed from the version before it), oldest first.
    log: VecDeque<(u64, Vec<Key>)>,
    /// Oldest version a delta can start from.
    floor: u64,
    max_keys: usize,
}

impl History {
    /// Starts from `snapshot`, keeping at most `max_keys` changed keys of history.
    pub fn new(snapshot: Snapshot, max_keys: usize) -> History {
        History {
            floor: snapshot.version,
            current: Arc::new(snapshot),
            log: VecDeque::new(),
            max_keys,
        }
    }

    /// The current snapshot.
    pub fn current(&self) -> &Arc<Snapshot> {
        &self.current
    }

    /// Moves to `version`: `upserts` replace entries, `removals` drop them. Entries
    /// equal to what is held are not counted as changes. Returns the keys that changed.
    pub fn advance(
        &mut self,
        version: u64,
        upserts: impl IntoIterator<Item = Entry>,
        removals: impl IntoIterator<Item = Key>,
    ) -> Vec<Key> {
        let snap = Arc::make_mut(&mut self.current);
        let mut changed = BTreeSet::new();
        for k in removals {
            if snap.entries.remove(&k).is_some() {
                changed.insert(k);
            }
        }
        for e in upserts {
            let Some(k) = Key::of(&e) else { continue };
            if snap.entries.get(&k).map(|e| &**e) != Some(&e) {
                snap.entries.insert(k.clone(), std::sync::Arc::new(e));
                changed.insert(k);
            }
        }
        snap.version = version;
        let changed: Vec<Key> = changed.into_iter().collect();
        self.log.push_back((version, changed.clone()));
        let mut total: usize = self.log.iter().map(|(_, k)| k.len().max(1)).sum();
        while total > self.max_keys {
            let Some((v, keys)) = self.log.pop_front() else {
                break;
            };
            total -= keys.len().max(1);
            self.floor = v;
        }
        changed
    }

    /// The base of the update a holder of `from` gets: `from` itself when the log
    /// reaches back that far, 0 (a full snapshot) when it does not, `None` when `from`
    /// is already current. Holders with the same base get the same update.
    pub fn base_for(&self, from: u64) -> Option<u64> {
        let cur = self.current.version;
        if from == cur {
            None
        } else if from == 0 || from < self.floor || from > cur {
            Some(0)
        } else {
            Some(from)
        }
    }

    /// The update that takes a holder of `from` to the current version: a delta when
    /// the log reaches back that far, else the full snapshot. `None` when `from` is
    /// already current.
    pub fn update_from(&self, from: u64) -> Option<Update> {
        let cur = &self.current;
        let from = self.base_for(from)?;
        if from == 0 {
            return Some(cur.full_update());
        }
        let keys: BTreeSet<&Key> = self
            .log
            .iter()
            .filter(|(v, _)| *v > from)
            .flat_map(|(_, k)| k.iter())
            .collect();
        let mut upserts = Vec::new();
        let mut removals = Vec::new();
        for k in keys {
            match cur.entries.get(k) {
                Some(e) => upserts.push((**e).clone()),
                None => removals.push(k.to_proto()),
            }
        }
        Some(Update {
            version: cur.version,
            base_version: from,
            full: false,
            upserts,
            removals,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::snapshot::tests::user;
    use crate::Kind;

    fn key(id: &str) -> Key {
        Key {
            kind: Kind::User,
            id: id.into(),
        }
    }

    #[test]
    fn deltas_from_any_recent_version_reach_the_same_state() {
        let base = Snapshot::new(1, [user("a", "1"), user("b", "1")]);
        let mut h = History::new(base.clone(), 1000);
        let mut states = vec![base.clone()];
        assert!(h.update_from(1).is_none());
        h.advance(2, [user("a", "2")], []);
        states.push((**h.current()).clone());
        h.advance(3, [user("c", "3")], [key("b")]);
        states.push((**h.current()).clone());
        // Unchanged entries are not changes.
        assert!(h.advance(4, [user("c", "3")], [key("zz")]).is_empty());
        states.push((**h.current()).clone());
        for held in &states {
            let mut s = held.clone();
            if let Some(u) = h.update_from(s.version) {
                if held.version != 0 {
                    assert!(!u.full, "a delta from {}", held.version);
                }
                s.apply(u).unwrap();
            }
            assert_eq!(&s, &**h.current(), "from {}", held.version);
        }
        let d = h.update_from(2).unwrap();
        assert_eq!(d.upserts.len(), 1);
        assert_eq!(d.removals.len(), 1);
        // Unknown or future versions get the full snapshot.
        assert!(h.update_from(0).unwrap().full);
        assert!(h.update_from(99).unwrap().full);
    }

    #[test]
    fn old_history_is_dropped_and_falls_back_to_full() {
        let mut h = History::new(Snapshot::new(1, [user("a", "1")]), 3);
        for v in 2..10u64 {
            h.advance(v, [user("a", &v.to_string())], []);
        }
        assert!(h.update_from(2).unwrap().full);
        assert!(!h.update_from(8).unwrap().full);
        let mut s = Snapshot::new(1, [user("a", "1")]);
        s.apply(h.update_from(1).unwrap()).unwrap();
        assert_eq!(&s, &**h.current());
    }
}
