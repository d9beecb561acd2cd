//! Compiled policies in the snapshot: each carries the small symbol table it was
//! compiled with, so a route's bytes depend on its policy alone and a delta that
//! changes one route ships one route. The proxy relinks each into its own table.

use vigil_policy::{CompiledPolicy, Symbols};

use crate::SnapshotError;

/// Serialises a policy with the symbol table it was compiled against.
pub fn encode_policy(policy: &CompiledPolicy, symbols: &Symbols) -> Vec<u8> {
    // Plain owned data into a Vec: serialisation cannot fail.
    postcard::to_allocvec(&(symbols, policy.to_bytes())).unwrap_or_default()
}

/// Loads a policy shipped by [`encode_policy`], interning its names into `into`.
pub fn decode_policy(bytes: &[u8], into: &mut Symbols) -> Result<CompiledPolicy, SnapshotError> {
    let (local, program): (Symbols, Vec<u8>) =
        postcard::from_bytes(bytes).map_err(|e| SnapshotError::Invalid(format!("policy: {e}")))?;
    let policy = CompiledPolicy::from_bytes(&program)
        .map_err(|e| SnapshotError::Invalid(format!("policy: {e}")))?;
    policy
        .relink(&local, into)
        .map_err(|e| SnapshotError::Invalid(format!("policy: {e}")))
}
