//! Errors a policy document can have, each located by a JSON Pointer.

use std::fmt;

/// One problem in a policy document: where it is and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// RFC 6901 JSON Pointer to the offending node (`""` is the whole document).
    pub pointer: String,
    /// A message a person can act on.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = if self.pointer.is_empty() {
            "/"
        } else {
            &self.pointer
        };
        write!(f, "{at}: {}", self.message)
    }
}

/// Why a policy document could not be read or compiled.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    /// The text is not well-formed JSON or YAML (or has a duplicate key).
    #[error("not a valid {format} document: {message}")]
    Syntax {
        /// `JSON` or `YAML`.
        format: &'static str,
        /// The parser's message, with line and column where known.
        message: String,
    },
    /// The document is well-formed but not a valid policy; every problem found is listed.
    #[error("{}", summarize(.0))]
    Invalid(Vec<Problem>),
}

impl PolicyError {
    /// The located problems (empty for a syntax error).
    pub fn problems(&self) -> &[Problem] {
        match self {
            PolicyError::Invalid(p) => p,
            PolicyError::Syntax { .. } => &[],
        }
    }
}

fn summarize(problems: &[Problem]) -> String {
    match problems {
        [] => "invalid policy".to_owned(),
        [one] => format!("invalid policy: {one}"),
        [first, rest @ ..] => format!("invalid policy: {first} (and {} more)", rest.len()),
    }
}

/// Appends one reference token to a JSON Pointer, escaping `~` and `/`.
pub(crate) fn push_pointer(base: &str, token: &str) -> String {
    let mut out = String::with_capacity(base.len() + token.len() + 1);
    out.push_str(base);
    out.push('/');
    for c in token.chars() {
        match c {
            '~' => out.push_str("~0"),
            '/' => out.push_str("~1"),
            c => out.push(c),
        }
    }
    out
}

/// Collects problems while a document is walked, so a user sees all of them at once.
#[derive(Debug, Default)]
pub(crate) struct Problems(pub Vec<Problem>);

impl Problems {
    /// Upper bound on reported problems; a hostile document should not make a huge response.
    const MAX: usize = 100;

    pub fn add(&mut self, pointer: &str, message: impl Into<String>) {
        if self.0.len() < Self::MAX {
            self.0.push(Problem {
                pointer: pointer.to_owned(),
                message: message.into(),
            });
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
