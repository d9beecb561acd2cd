//! Request paths made canonical before anything looks at them: the route match, the
//! policy and the upstream all see the one path this returns.
//!
//! The rule, in order:
//! 1. The path must start with `/` and hold only visible ASCII (no space, control
//!    character or raw byte above 0x7E), and no `\`.
//! 2. Every `%XX` must be two hex digits. `%2F` (`/`), `%5C` (`\`) and `%00` are
//!    refused: a path separator or NUL smuggled in encoded form means something
//!    different to different servers. Percent-encoded bytes must decode to valid
//!    UTF-8.
//! 3. Encoded unreserved characters (letters, digits, `-`, `.`, `_`, `~`) are
//!    decoded; every other escape is kept, with its hex digits in upper case.
//! 4. Runs of `/` become one `/`.
//! 5. Dot segments (`.` and `..`, also when written `%2E`) are removed as RFC 3986
//!    section 5.2.4 says; `..` never climbs above the root.
//!
//! A trailing `/` is kept. The query string is not part of the path and is left
//! to the caller.

use std::fmt;

/// Why a path was refused (the proxy answers 400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    /// Does not start with `/`.
    NotAbsolute,
    /// A byte that may not appear in a path.
    BadByte(u8),
    /// `%` not followed by two hex digits.
    BadEscape,
    /// `%2F`, `%5C` or `%00`.
    EncodedSeparator,
    /// Percent-encoded bytes that are not UTF-8.
    NotUtf8,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathError::NotAbsolute => f.write_str("the path must start with `/`"),
            PathError::BadByte(b) => {
                write!(f, "the path holds byte 0x{b:02X}, which is not allowed")
            }
            PathError::BadEscape => {
                f.write_str("the path has a `%` not followed by two hex digits")
            }
            PathError::EncodedSeparator => {
                f.write_str("the path has an encoded `/`, `\\` or NUL (%2F, %5C, %00)")
            }
            PathError::NotUtf8 => f.write_str("the path's percent-encoded bytes are not UTF-8"),
        }
    }
}

impl std::error::Error for PathError {}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The canonical form of `raw` (the request target's path, without its query).
pub fn normalize_path(raw: &str) -> Result<String, PathError> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // Steps 1-3: check and decode what may be decoded; collect every escaped byte
    // to check that together they are UTF-8.
    let mut decoded = String::with_capacity(raw.len());
    let mut escaped = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(PathError::BadEscape);
            };
            let v = h * 16 + l;
            if matches!(v, b'/' | b'\\' | 0) {
                return Err(PathError::EncodedSeparator);
            }
            if unreserved(v) {
                decoded.push(char::from(v));
            } else {
                escaped.push(v);
                decoded.push('%');
                decoded.push(char::from(b"0123456789ABCDEF"[usize::from(h)]));
                decoded.push(char::from(b"0123456789ABCDEF"[usize::from(l)]));
            }
            i += 3;
            continue;
        }
        if !(0x21..=0x7E).contains(&b) || b == b'\\' {
            return Err(PathError::BadByte(b));
        }
        decoded.push(char::from(b));
        i += 1;
    }
    if !escaped.is_empty() && !utf8_runs(bytes) {
        return Err(PathError::NotUtf8);
    }
    // Steps 4-5: one pass over the segments.
    let trailing = decoded.ends_with('/');
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for s in &out {
        path.push('/');
        path.push_str(s);
    }
    let last_is_dot = matches!(decoded.rsplit('/').next(), Some(".") | Some(".."));
    if path.is_empty() || trailing || (last_is_dot && !out.is_empty()) {
        path.push('/');
    }
    Ok(path)
}

/// Whether every run of consecutive `%XX` escapes in `raw` decodes to UTF-8 (a
/// character's bytes are always escaped together). `raw`'s escapes are valid.
fn utf8_runs(raw: &[u8]) -> bool {
    let mut run = Vec::new();
    let mut i = 0;
    loop {
        if raw.get(i) == Some(&b'%') {
            if let (Some(h), Some(l)) = (
                raw.get(i + 1).copied().and_then(hex),
                raw.get(i + 2).copied().and_then(hex),
            ) {
                run.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        if std::str::from_utf8(&run).is_err() {
            return false;
        }
        run.clear();
        if i >= raw.len() {
            return true;
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> String {
        normalize_path(raw).unwrap_or_else(|e| panic!("{raw}: {e}"))
    }

    #[test]
    fn canonical_forms() {
        for (raw, want) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("//a///b", "/a/b"),
            ("/a/./b", "/a/b"),
            ("/a/../b", "/b"),
            ("/../../a", "/a"),
            ("/a/..", "/"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/%61%64min", "/admin"),
            ("/%2e%2e/admin", "/admin"),
            ("/x/%2E%2E/admin", "/admin"),
            ("/a%7eb", "/a~b"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/a%20b", "/a%20b"),
            ("/a%3fb", "/a%3Fb"),
            ("/a;b=c", "/a;b=c"),
        ] {
            assert_eq!(ok(raw), want, "{raw}");
        }
    }

    #[test]
    fn refusals() {
        for (raw, want) in [
            ("", PathError::NotAbsolute),
            ("a/b", PathError::NotAbsolute),
            ("*", PathError::NotAbsolute),
            ("/admin/..%2f", PathError::EncodedSeparator),
            ("/a%2Fb", PathError::EncodedSeparator),
            ("/a%5cb", PathError::EncodedSeparator),
            ("/a%00", PathError::EncodedSeparator),
            ("/a\\b", PathError::BadByte(b'\\')),
            ("/a b", PathError::BadByte(b' ')),
            ("/a\u{7f}", PathError::BadByte(0x7f)),
            ("/é", PathError::BadByte(0xC3)),
            ("/a%", PathError::BadEscape),
            ("/a%4", PathError::BadEscape),
            ("/a%zz", PathError::BadEscape),
            ("/a%c3%28", PathError::NotUtf8),
            ("/a%ff", PathError::NotUtf8),
            ("/a%c3", PathError::NotUtf8),
        ] {
            assert_eq!(normalize_path(raw), Err(want), "{raw:?}");
        }
    }

    #[test]
    fn normalising_twice_changes_nothing() {
        let samples = [
            "/a/../b/./c//d/",
            "/%2e%2e/%2E/x",
            "/caf%c3%a9/..",
            "/a%20b/%7E",
            "/.././../",
        ];
        for raw in samples {
            let once = ok(raw);
            assert_eq!(ok(&once), once, "{raw}");
        }
    }

    #[test]
    fn no_output_holds_a_dot_segment_or_double_slash() {
        // Every path over a small alphabet, up to 6 characters.
        let alphabet = ["/", ".", "a", "%2e", "%2E", "%61"];
        let mut frontier = vec![String::from("/")];
        for _ in 0..5 {
            let mut next = Vec::new();
            for p in &frontier {
                for c in alphabet {
                    let s = format!("{p}{c}");
                    let n = ok(&s);
                    assert!(n.starts_with('/'), "{s} -> {n}");
                    assert!(!n.contains("//"), "{s} -> {n}");
                    assert!(
                        n.split('/').all(|seg| seg != "." && seg != ".."),
                        "{s} -> {n}"
                    );
                    assert_eq!(ok(&n), n, "{s} -> {n} is not stable");
                    next.push(s);
                }
            }
            frontier = next;
        }
    }
}
