//! Authentication method references (RFC 8176, IANA registry) as a bit set.

/// The registered `amr` values, in bit order.
pub const AMR_VALUES: [&str; 21] = [
    "face", "fpt", "geo", "hwk", "iris", "kba", "mca", "mfa", "otp", "pin", "pop", "pwd", "rba",
    "retina", "sc", "sms", "swk", "tel", "user", "vbm", "wia",
];

/// A set of authentication methods; values outside the registry are ignored.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Amr(pub u32);

impl Amr {
    /// The bit of one registered value, if registered (exact, lowercase).
    pub fn bit(value: &str) -> Option<Amr> {
        AMR_VALUES
            .iter()
            .position(|v| *v == value)
            .map(|i| Amr(1 << i))
    }

    /// Builds the set from a token's `amr` claim values.
    pub fn from_values<'a>(values: impl IntoIterator<Item = &'a str>) -> Amr {
        values
            .into_iter()
            .filter_map(Amr::bit)
            .fold(Amr(0), |a, b| Amr(a.0 | b.0))
    }

    /// Whether every method of `other` is in `self`.
    pub fn contains_all(self, other: Amr) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether any method of `other` is in `self`.
    pub fn contains_any(self, other: Amr) -> bool {
        self.0 & other.0 != 0
    }

    /// Multi-factor: the IdP said `mfa`, or the methods span at least two factor
    /// categories (knowledge, possession, inherence). Two passwords are one factor.
    pub fn is_multi_factor(self) -> bool {
        let categories = [KNOWLEDGE, POSSESSION, INHERENCE]
            .into_iter()
            .filter(|&c| self.contains_any(c))
            .count();
        self.contains_any(MFA) || categories >= 2
    }
}

const MFA: Amr = set_of(&["mfa"]);
const KNOWLEDGE: Amr = set_of(&["pwd", "pin", "kba"]);
const POSSESSION: Amr = set_of(&["hwk", "swk", "otp", "sms", "tel", "sc", "pop"]);
const INHERENCE: Amr = set_of(&["face", "fpt", "iris", "retina", "vbm"]);

/// [`Amr::from_values`] at compile time, so no request looks names up.
const fn set_of(names: &[&str]) -> Amr {
    const fn same(a: &str, b: &str) -> bool {
        let (a, b) = (a.as_bytes(), b.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        let mut i = 0;
        while i < a.len() {
            if a[i] != b[i] {
                return false;
            }
            i += 1;
        }
        true
    }
    let mut bits = 0;
    let mut i = 0;
    while i < names.len() {
        let mut j = 0;
        while j < AMR_VALUES.len() {
            if same(names[i], AMR_VALUES[j]) {
                bits |= 1 << j;
            }
            j += 1;
        }
        i += 1;
    }
    Amr(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_and_multi_factor() {
        assert_eq!(Amr::from_values(["pwd", "bogus"]), Amr::bit("pwd").unwrap());
        assert!(!Amr::from_values(["pwd"]).is_multi_factor());
        assert!(Amr::from_values(["pwd", "otp"]).is_multi_factor());
        assert!(Amr::from_values(["hwk", "fpt"]).is_multi_factor());
        assert!(Amr::from_values(["mfa"]).is_multi_factor());
        assert!(
            !Amr::from_values(["pwd", "kba"]).is_multi_factor(),
            "two knowledge factors"
        );
        assert!(
            !Amr::from_values(["pwd", "geo"]).is_multi_factor(),
            "location is not a factor"
        );
        assert!(
            !Amr::from_values(["otp", "sms"]).is_multi_factor(),
            "two possession factors"
        );
        assert!(!Amr::from_values(["pwd", "pwd", "nope"]).is_multi_factor());
        assert!(Amr::bit("PWD").is_none());
        assert_eq!(KNOWLEDGE, Amr::from_values(["pwd", "pin", "kba"]));
        assert_eq!(MFA, Amr::bit("mfa").unwrap());
        assert_eq!(KNOWLEDGE.0.count_ones(), 3);
        assert_eq!(POSSESSION.0.count_ones(), 7);
        assert_eq!(INHERENCE.0.count_ones(), 5);
    }
}
