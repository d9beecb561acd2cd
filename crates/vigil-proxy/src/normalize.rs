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
//! 6. A segment with parameters (`;`) whose name is empty, `.` or `..` (`..;x`,
//!    `;x`) is refused: servers that drop path parameters (Tomcat, Jetty, Spring)
//!    read it as a dot segment or an empty one, and would serve another path than
//!    the one routed and decided.
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
    /// A dot or empty segment with parameters (`..;x`).
    DotSegmentParams,
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
            PathError::DotSegmentParams => {
                f.write_str("the path has a dot or empty segment with parameters (`..;`)")
            }
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

/// The canonical form of `raw` (the request target's path, without its query), in
/// one pass over its segments: each is checked and decoded into a reused buffer,
/// then appended, skipped (`.`, empty) or used to drop the last one (`..`).
pub fn normalize_path(raw: &str) -> Result<String, PathError> {
    let Some(rest) = raw.strip_prefix('/') else {
        return Err(PathError::NotAbsolute);
    };
    let mut out = String::with_capacity(raw.len());
    let mut seg = String::new();
    // The bytes of the current run of escapes, checked as UTF-8 when the run ends.
    let mut run: Vec<u8> = Vec::new();
    let mut last_is_dot = false;
    for raw_seg in rest.split('/') {
        seg.clear();
        decode_segment(raw_seg.as_bytes(), &mut seg, &mut run)?;
        if let Some((name, _)) = seg.split_once(';') {
            if matches!(name, "" | "." | "..") {
                return Err(PathError::DotSegmentParams);
            }
        }
        last_is_dot = matches!(seg.as_str(), "." | "..");
        match seg.as_str() {
            "" | "." => {}
            ".." => out.truncate(out.rfind('/').unwrap_or(0)),
            s => {
                out.push('/');
                out.push_str(s);
            }
        }
    }
    if out.is_empty() || raw.ends_with('/') || last_is_dot {
        out.push('/');
    }
    Ok(out)
}

/// `path` (canonical) with every segment's parameters (`;...`) cut off: the path a
/// server that drops them (Tomcat, Jetty) serves. The proxy refuses a path whose
/// route this changes.
pub fn without_params(path: &str) -> String {
    path.split('/')
        .map(|seg| seg.split_once(';').map_or(seg, |(name, _)| name))
        .collect::<Vec<_>>()
        .join("/")
}

/// Steps 1-3 for one segment: appends its decoded form to `out`.
fn decode_segment(bytes: &[u8], out: &mut String, run: &mut Vec<u8>) -> Result<(), PathError> {
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            end_run(run)?;
            if !(0x21..=0x7E).contains(&b) || b == b'\\' {
                return Err(PathError::BadByte(b));
            }
            out.push(char::from(b));
            i += 1;
            continue;
        }
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
        run.push(v);
        if unreserved(v) {
            out.push(char::from(v));
        } else {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            out.push('%');
            out.push(char::from(HEX[usize::from(h)]));
            out.push(char::from(HEX[usize::from(l)]));
        }
        i += 3;
    }
    // A segment's end (a `/` or the path's end) ends the run too.
    end_run(run)
}

/// Checks that a run of escaped bytes is UTF-8 (a character's bytes are always
/// escaped together), and empties it.
fn end_run(run: &mut Vec<u8>) -> Result<(), PathError> {
    if !run.is_empty() {
        std::str::from_utf8(run).map_err(|_| PathError::NotUtf8)?;
        run.clear();
    }
    Ok(())
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
            ("/a/b;v=1/c;jsessionid=x", "/a/b;v=1/c;jsessionid=x"),
            ("/a/...;x", "/a/...;x"),
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
            ("/x/..;/admin", PathError::DotSegmentParams),
            ("/x/%2e%2E;a=b/admin", PathError::DotSegmentParams),
            ("/x/.;/admin", PathError::DotSegmentParams),
            ("/;x/admin", PathError::DotSegmentParams),
            ("/x/;", PathError::DotSegmentParams),
        ] {
            assert_eq!(normalize_path(raw), Err(want), "{raw:?}");
        }
    }

    #[test]
    fn parameters_come_off_every_segment() {
        for (path, want) in [
            ("/a/b", "/a/b"),
            ("/admin;x=1/panel", "/admin/panel"),
            ("/a;b/c;d=e;f/", "/a/c/"),
            ("/app/page.jsp;jsessionid=1", "/app/page.jsp"),
        ] {
            assert_eq!(without_params(path), want, "{path}");
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
