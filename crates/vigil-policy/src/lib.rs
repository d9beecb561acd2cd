//! Vigil's policy language: parse JSON/YAML policy documents, compile them into a
//! compact serialisable program, evaluate it per request without allocating, and
//! explain decisions. No I/O; nothing here knows of HTTP, SQL or gRPC.

pub mod amr;
pub mod ast;
mod compile;
mod compiled;
pub mod doc;
mod error;
mod explain;
#[cfg(any(test, feature = "test-util"))]
pub mod interp;
mod parse;
pub mod request;
mod symbols;
#[cfg(test)]
mod tests;
mod text;
mod zone;

pub use amr::Amr;
pub use ast::{Document, Effect};
pub use compile::{compile, CompileEnv, Directory, EntityKind, Library, MAX_REFERENCE_DEPTH};
pub use compiled::{CompiledPolicy, Decision, LoadError, RuleInfo, Truth, FORMAT_VERSION};
pub use error::{PolicyError, Problem};
pub use explain::{Explanation, RuleTrace, Trace};
pub use parse::{
    parse, parse_fingerprint, parse_net, to_hex, CRITERIA, MAX_DEPTH, MAX_NODES, MAX_PATTERNS,
};
pub use request::{
    ClientCertificate, Device, GrantWindow, HeaderList, HeaderValue, Headers, Id, NoHeaders,
    Posture, Request, Session, User,
};
pub use symbols::{Interner, Sym, Symbols};

/// Parses a JSON policy document.
pub fn parse_json(text: &str) -> Result<Document, PolicyError> {
    parse(&doc::from_json(text)?)
}

/// Parses a YAML policy document.
pub fn parse_yaml(text: &str) -> Result<Document, PolicyError> {
    parse(&doc::from_yaml(text)?)
}

/// Parses a policy already read as JSON (as the REST API receives it). Duplicate keys
/// cannot be detected at this point; prefer [`parse_json`] on the raw text.
pub fn parse_json_value(value: &serde_json::Value) -> Result<Document, PolicyError> {
    parse(&doc::Value::from(value))
}

/// Parses and compiles a standalone policy with a fresh symbol table, no directory
/// and no named policies: handy for validation and tests.
pub fn compile_standalone(
    doc: &Document,
    symbols: &mut Symbols,
) -> Result<CompiledPolicy, PolicyError> {
    compile(
        doc,
        CompileEnv {
            symbols,
            directory: None,
            library: None,
            name: None,
        },
    )
}
