//! Interning: names of users, groups, service accounts, devices and posture
//! attributes become small integers shared by the snapshot and its policies.

use std::collections::HashMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An interned name. [`Sym::NONE`] stands for a name the table does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Sym(pub u32);

impl Sym {
    /// Matches no interned name (an identity the snapshot does not know yet).
    pub const NONE: Sym = Sym(u32::MAX);
}

/// One namespace of interned names, ids assigned densely in order of first use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interner {
    names: Vec<Box<str>>,
    index: HashMap<Box<str>, Sym>,
}

impl Interner {
    /// The id of `name`, adding it if new.
    pub fn intern(&mut self, name: &str) -> Sym {
        if let Some(s) = self.index.get(name) {
            return *s;
        }
        let s = Sym(u32::try_from(self.names.len()).unwrap_or(u32::MAX - 1));
        self.names.push(name.into());
        self.index.insert(name.into(), s);
        s
    }

    /// The id of `name`, if interned.
    pub fn get(&self, name: &str) -> Option<Sym> {
        self.index.get(name).copied()
    }

    /// The name of `sym`, if it is in this table.
    pub fn name(&self, sym: Sym) -> Option<&str> {
        self.names.get(sym.0 as usize).map(|n| &**n)
    }

    /// How many names are interned.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

impl Serialize for Interner {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.names.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Interner {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names = Vec::<Box<str>>::deserialize(d)?;
        let mut index = HashMap::with_capacity(names.len());
        for (i, n) in names.iter().enumerate() {
            let sym = Sym(u32::try_from(i).map_err(serde::de::Error::custom)?);
            if index.insert(n.clone(), sym).is_some() {
                return Err(serde::de::Error::custom(format_args!(
                    "name `{n}` interned twice"
                )));
            }
        }
        Ok(Interner { names, index })
    }
}

/// The namespaces a snapshot interns.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Symbols {
    /// User ids.
    pub users: Interner,
    /// Group names.
    pub groups: Interner,
    /// Service account ids.
    pub service_accounts: Interner,
    /// Device ids.
    pub devices: Interner,
    /// Device posture attribute names.
    pub attributes: Interner,
    /// Email domains, folded to lower case.
    pub domains: Interner,
}

impl Symbols {
    /// The interned domain of an email address ([`Sym::NONE`] when no policy names it),
    /// for [`crate::User::domain`]. Computed once per identity, not per request.
    pub fn domain_of(&self, email: &str) -> Sym {
        email
            .rsplit_once('@')
            .and_then(|(_, d)| self.domains.get(&crate::text::fold(d)))
            .unwrap_or(Sym::NONE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intern_is_stable_and_round_trips() {
        let mut i = Interner::default();
        let a = i.intern("a");
        assert_eq!(i.intern("b"), Sym(1));
        assert_eq!(i.intern("a"), a);
        assert_eq!(i.name(a), Some("a"));
        assert_eq!(i.name(Sym::NONE), None);
        let bytes = postcard::to_allocvec(&i).unwrap();
        let back: Interner = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, i);
        assert_eq!(back.get("b"), Some(Sym(1)));
        let dup = postcard::to_allocvec(&vec!["x", "x"]).unwrap();
        assert!(postcard::from_bytes::<Interner>(&dup).is_err());
    }
}
