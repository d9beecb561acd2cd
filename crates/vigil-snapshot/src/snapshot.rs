//! A snapshot: entries by (kind, id) at one version, and applying updates to it.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::sync::Arc;

use vigil_proto::v1::entry::Body;

use crate::{Entry, EntryKey, Kind, SnapshotError, Update};

/// The kind an entry's body makes it.
pub fn kind_of(body: &Body) -> Kind {
    match body {
        Body::Route(_) => Kind::Route,
        Body::User(_) => Kind::User,
        Body::Device(_) => Kind::Device,
        Body::ServiceAccount(_) => Kind::ServiceAccount,
        Body::Grant(_) => Kind::Grant,
        Body::IdentityProvider(_) => Kind::IdentityProvider,
        Body::RevokedSession(_) => Kind::RevokedSession,
    }
}

/// Where an entry lives: ordered by kind, then id, the order updates list them in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    /// The kind.
    pub kind: Kind,
    /// The id within the kind.
    pub id: String,
}

impl Key {
    /// The key of an entry; `None` when the entry has no body.
    pub fn of(entry: &Entry) -> Option<Key> {
        entry.body.as_ref().map(|b| Key {
            kind: kind_of(b),
            id: entry.id.clone(),
        })
    }

    fn from_proto(k: &EntryKey) -> Result<Key, SnapshotError> {
        match Kind::try_from(k.kind) {
            Ok(Kind::Unspecified) | Err(_) => Err(SnapshotError::Invalid(format!(
                "removal of `{}` has unknown kind {}",
                k.id, k.kind
            ))),
            Ok(kind) => Ok(Key {
                kind,
                id: k.id.clone(),
            }),
        }
    }

    /// The wire form.
    pub fn to_proto(&self) -> EntryKey {
        EntryKey {
            kind: self.kind as i32,
            id: self.id.clone(),
        }
    }
}

/// A key seen through its parts, so that a lookup by (kind, id) builds no [`Key`]
/// (and allocates nothing): the map compares keys through this view.
trait KeyView {
    fn parts(&self) -> (Kind, &str);
}

impl KeyView for Key {
    fn parts(&self) -> (Kind, &str) {
        (self.kind, &self.id)
    }
}

impl KeyView for (Kind, &str) {
    fn parts(&self) -> (Kind, &str) {
        *self
    }
}

impl PartialEq for dyn KeyView + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn KeyView + '_ {}

impl PartialOrd for dyn KeyView + '_ {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

// The same order as `Key`'s derived one: kind, then id.
impl Ord for dyn KeyView + '_ {
    fn cmp(&self, other: &Self) -> Ordering {
        self.parts().cmp(&other.parts())
    }
}

impl<'a> Borrow<dyn KeyView + 'a> for Key {
    fn borrow(&self) -> &(dyn KeyView + 'a) {
        self
    }
}

/// Everything a proxy holds at one version. The entries are a persistent map, so a
/// copy costs nothing and applying a delta to it costs only the entries it touches:
/// the next version is built beside the one requests still read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// The database revision it was built from; 0 for "nothing yet".
    pub version: u64,
    /// The entries, each shared between the versions that hold it unchanged (a
    /// delta copies a few map nodes of pointers, not the entries beside it).
    pub entries: imbl::OrdMap<Key, Arc<Entry>>,
}

impl Snapshot {
    /// A snapshot of `entries` at `version` (entries without a body are dropped).
    pub fn new(version: u64, entries: impl IntoIterator<Item = Entry>) -> Snapshot {
        let entries = entries
            .into_iter()
            .filter_map(|e| Key::of(&e).map(|k| (k, Arc::new(e))))
            .collect();
        Snapshot { version, entries }
    }

    /// The entry at `kind`/`id`.
    pub fn get(&self, kind: Kind, id: &str) -> Option<&Entry> {
        self.entries.get(&(kind, id) as &dyn KeyView).map(|e| &**e)
    }

    /// All entries of one kind, in id order.
    pub fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &Entry> + '_ {
        self.entries
            .range(
                Key {
                    kind,
                    id: String::new(),
                }..,
            )
            .take_while(move |(k, _)| k.kind == kind)
            .map(|(_, e)| &**e)
    }

    /// The whole snapshot as a full update.
    pub fn full_update(&self) -> Update {
        Update {
            version: self.version,
            base_version: 0,
            full: true,
            upserts: self.entries.values().map(|e| (**e).clone()).collect(),
            removals: Vec::new(),
        }
    }

    /// Applies a full update or a delta. Everything is checked before anything
    /// changes: on error the snapshot is exactly what it was.
    pub fn apply(&mut self, update: Update) -> Result<(), SnapshotError> {
        self.apply_except(update, Kind::Unspecified)
    }

    /// [`Snapshot::apply`], keeping no entry of kind `left_out`: for a holder that
    /// keeps those entries in a form of its own (the proxy's users). The whole
    /// update is checked all the same.
    pub fn apply_except(&mut self, update: Update, left_out: Kind) -> Result<(), SnapshotError> {
        let (upserts, removals) = validate(&update)?;
        let entries = upserts
            .into_iter()
            .zip(update.upserts)
            .filter(|(k, _)| k.kind != left_out)
            .map(|(k, e)| (k, Arc::new(e)));
        if update.full {
            *self = Snapshot {
                version: update.version,
                entries: entries.collect(),
            };
            return Ok(());
        }
        if update.base_version != self.version {
            return Err(SnapshotError::WrongBase {
                base: update.base_version,
                held: self.version,
            });
        }
        for k in removals {
            self.entries.remove(&k);
        }
        for (k, e) in entries {
            self.entries.insert(k, e);
        }
        self.version = update.version;
        Ok(())
    }
}

/// Checks an update's shape; returns the keys of its upserts and of its removals.
fn validate(u: &Update) -> Result<(Vec<Key>, Vec<Key>), SnapshotError> {
    let bad = |m: String| Err(SnapshotError::Invalid(m));
    if u.version == 0 {
        return bad("version 0".into());
    }
    if u.full {
        if u.base_version != 0 || !u.removals.is_empty() {
            return bad("a full snapshot has no base version and no removals".into());
        }
    } else if u.base_version >= u.version {
        return bad(format!(
            "delta from {} to {} goes backwards",
            u.base_version, u.version
        ));
    }
    let mut ups: Vec<Key> = Vec::with_capacity(u.upserts.len());
    for e in &u.upserts {
        let Some(k) = Key::of(e) else {
            return bad(format!("entry `{}` has no body", e.id));
        };
        if ups.last().is_some_and(|p| *p >= k) {
            return bad(format!("entries out of order or repeated at `{}`", e.id));
        }
        ups.push(k);
    }
    let mut removals: Vec<Key> = Vec::with_capacity(u.removals.len());
    for r in &u.removals {
        let k = Key::from_proto(r)?;
        if removals.last().is_some_and(|p| *p >= k) {
            return bad(format!("removals out of order or repeated at `{}`", r.id));
        }
        // A key both removed and upserted is ambiguous.
        if ups.binary_search(&k).is_ok() {
            return bad(format!("`{}` is both changed and removed", k.id));
        }
        removals.push(k);
    }
    Ok((ups, removals))
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use vigil_proto::v1::{Grant, User};

    pub(crate) fn user(id: &str, email: &str) -> Entry {
        Entry {
            id: id.into(),
            body: Some(Body::User(User {
                email: Some(email.into()),
                ..Default::default()
            })),
        }
    }

    fn grant(id: &str) -> Entry {
        Entry {
            id: id.into(),
            body: Some(Body::Grant(Grant::default())),
        }
    }

    #[test]
    fn lookups_by_parts_agree_with_the_key_order() {
        // The same id under two kinds, and ids on either side of it.
        let s = Snapshot::new(
            1,
            [
                user("m", "u@x"),
                user("a", "a@x"),
                user("z", "z@x"),
                grant("m"),
            ],
        );
        for (kind, id) in [
            (Kind::User, "m"),
            (Kind::User, "a"),
            (Kind::User, "z"),
            (Kind::Grant, "m"),
        ] {
            let e = s.get(kind, id).unwrap();
            assert_eq!((Key::of(e).unwrap().kind, e.id.as_str()), (kind, id));
        }
        assert!(s.get(Kind::Grant, "a").is_none());
        assert!(s.get(Kind::User, "mm").is_none());
        assert!(s.get(Kind::Device, "m").is_none());
    }

    #[test]
    fn full_then_delta() {
        let mut s = Snapshot::default();
        s.apply(Snapshot::new(3, [user("a", "a@x"), user("b", "b@x"), grant("g")]).full_update())
            .unwrap();
        assert_eq!(s.version, 3);
        assert_eq!(s.of_kind(Kind::User).count(), 2);
        let delta = Update {
            version: 5,
            base_version: 3,
            full: false,
            upserts: vec![user("c", "c@x")],
            removals: vec![Key {
                kind: Kind::User,
                id: "a".into(),
            }
            .to_proto()],
        };
        s.apply(delta.clone()).unwrap();
        assert_eq!(s.version, 5);
        let ids: Vec<_> = s.of_kind(Kind::User).map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["b", "c"]);
        // The same delta again no longer applies: it is from version 3.
        assert!(matches!(
            s.apply(delta),
            Err(SnapshotError::WrongBase { base: 3, held: 5 })
        ));
    }

    #[test]
    fn a_kind_can_be_left_out() {
        let mut s = Snapshot::default();
        let full = Snapshot::new(3, [user("a", "a@x"), grant("g")]).full_update();
        s.apply_except(full, Kind::User).unwrap();
        assert_eq!(s.version, 3);
        assert!(s.get(Kind::User, "a").is_none());
        assert!(s.get(Kind::Grant, "g").is_some());
        // Still checked whole: a user out of order is refused.
        let bad = Update {
            version: 4,
            base_version: 3,
            full: false,
            upserts: vec![user("b", ""), user("a", "")],
            removals: vec![],
        };
        assert!(s.apply_except(bad, Kind::User).is_err());
        assert_eq!(s.version, 3);
    }

    #[test]
    fn malformed_updates_change_nothing() {
        let mut s = Snapshot::new(2, [user("a", "a@x")]);
        let before = s.clone();
        let d = |upserts: Vec<Entry>, removals: Vec<EntryKey>| Update {
            version: 3,
            base_version: 2,
            full: false,
            upserts,
            removals,
        };
        let rm = |id: &str| EntryKey {
            kind: Kind::User as i32,
            id: id.into(),
        };
        for bad in [
            d(vec![user("b", ""), user("a", "")], vec![]),
            d(vec![user("a", ""), user("a", "")], vec![]),
            d(
                vec![Entry {
                    id: "x".into(),
                    body: None,
                }],
                vec![],
            ),
            d(vec![], vec![rm("b"), rm("a")]),
            d(vec![user("a", "")], vec![rm("a")]),
            d(
                vec![],
                vec![EntryKey {
                    kind: 99,
                    id: "a".into(),
                }],
            ),
            Update {
                version: 2,
                ..d(vec![], vec![])
            },
            Update {
                version: 0,
                full: true,
                base_version: 0,
                ..Default::default()
            },
            Update {
                full: true,
                ..d(vec![], vec![rm("a")])
            },
        ] {
            assert!(s.apply(bad.clone()).is_err(), "{bad:?}");
            assert_eq!(s, before);
        }
    }
}
