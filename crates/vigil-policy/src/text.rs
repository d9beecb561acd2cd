//! Case-insensitive comparisons that fold one character at a time, so the
//! request side is never lowercased into a new allocation.

/// Folds a policy operand the same way the comparisons fold request values.
pub fn fold(s: &str) -> String {
    s.chars().flat_map(char::to_lowercase).collect()
}

fn folded(s: &str) -> impl DoubleEndedIterator<Item = char> + '_ {
    s.chars().flat_map(char::to_lowercase)
}

/// `value` equals the already folded `want`, ignoring case.
pub fn fold_eq(value: &str, want: &str) -> bool {
    if value.is_ascii() {
        value.len() == want.len() && value.eq_ignore_ascii_case(want)
    } else {
        folded(value).eq(want.chars())
    }
}

/// `value` begins with the already folded `prefix`, ignoring case.
pub fn fold_starts_with(value: &str, prefix: &str) -> bool {
    let mut it = folded(value);
    prefix.chars().all(|c| it.next() == Some(c))
}

/// `value` ends with the already folded `suffix`, ignoring case.
pub fn fold_ends_with(value: &str, suffix: &str) -> bool {
    let mut it = value.chars().rev().flat_map(|c| c.to_lowercase().rev());
    suffix.chars().rev().all(|c| it.next() == Some(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folding_handles_unicode_without_allocating_the_value() {
        assert!(fold_eq("JOSÉ@Example.COM", &fold("josé@example.com")));
        assert!(fold_eq("ΣΟΦΙΑ", &fold("σοφια")));
        assert!(!fold_eq("josé", "jose"));
        assert!(fold_starts_with("Ärger@x", &fold("ä")));
        assert!(fold_ends_with("a@BÜCHER.de", &fold("@bücher.DE")));
        assert!(!fold_ends_with("e", "de"));
        // A capital with a multi-character lowercase form (İ → i̇) folds consistently.
        assert!(fold_eq("İ", &fold("İ")));
        assert!(fold_ends_with("xİ", &fold("İ")));
    }
}
