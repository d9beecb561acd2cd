//! Large updates in parts ([`v1::UpdatePart`]): split by the control plane, joined
//! by the proxy, so that neither end's gRPC buffers grow to a full snapshot's size.

use prost::bytes::Bytes;

use crate::v1::{self, Envelope, UpdatePart};

/// The largest payload slice one message carries; larger updates go in parts.
pub const UPDATE_PART_BYTES: usize = 1 << 20;

/// How an update goes on the stream: whole when its payload fits in `part_bytes`,
/// else as parts of at most `part_bytes` of payload each (slices of the same
/// shared buffer, not copies).
pub fn update_messages(envelope: Envelope, part_bytes: usize) -> Vec<v1::control_message::Msg> {
    use v1::control_message::Msg;
    let part_bytes = part_bytes.max(1);
    if envelope.payload.len() <= part_bytes {
        return vec![Msg::Update(envelope)];
    }
    let Envelope {
        payload,
        signature,
        key_id,
    } = envelope;
    let total = payload.len();
    let count = total.div_ceil(part_bytes);
    let mut last_part = Some((signature, key_id));
    (0..count)
        .map(|i| {
            let start = i * part_bytes;
            let slice = payload.slice(start..(start + part_bytes).min(total));
            let last = i + 1 == count;
            let (signature, key_id) = if last {
                last_part.take().unwrap_or_default()
            } else {
                Default::default()
            };
            Msg::UpdatePart(UpdatePart {
                payload: slice,
                payload_len: if i == 0 { total as u64 } else { 0 },
                signature,
                key_id,
                last,
            })
        })
        .collect()
}

/// Why parts could not be joined. The receiver answers with a nack, which makes
/// the control plane send the full snapshot again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PartsError {
    /// A part that is not a first one, with no update begun.
    #[error("an update part arrived with no update begun")]
    NotBegun,
    /// The parts add up to more, or less, than the first part announced.
    #[error("update parts add up to {got} bytes, the first announced {announced}")]
    WrongLength {
        /// What the first part announced.
        announced: u64,
        /// What arrived.
        got: u64,
    },
    /// The first part announced more than any snapshot may be.
    #[error("an update of {0} bytes was announced; at most {MAX_UPDATE_BYTES} are taken")]
    TooLarge(u64),
}

/// The largest update a proxy joins from parts (1 GiB): far above any real
/// snapshot, so that a wrong announcement cannot make it gather without bound.
pub const MAX_UPDATE_BYTES: u64 = 1 << 30;

/// The parts of one update received so far.
#[derive(Debug, Default)]
pub struct Joiner {
    /// The payload so far and the length the first part announced.
    partial: Option<(Vec<u8>, u64)>,
}

/// Room reserved up front at most, whatever a first part announces: a wrong
/// length then costs no more than this before it is found out.
const RESERVE_MAX: u64 = 256 << 20;

impl Joiner {
    /// Takes the next part; returns the envelope once its last part is in. A first
    /// part drops whatever was left incomplete (the sender moved on to another
    /// update); on error nothing is kept.
    pub fn push(&mut self, part: UpdatePart) -> Result<Option<Envelope>, PartsError> {
        if part.payload_len > MAX_UPDATE_BYTES {
            self.partial = None;
            return Err(PartsError::TooLarge(part.payload_len));
        }
        if part.payload_len > 0 {
            let reserve = usize::try_from(part.payload_len.min(RESERVE_MAX)).unwrap_or(0);
            self.partial = Some((Vec::with_capacity(reserve), part.payload_len));
        }
        let Some((payload, announced)) = self.partial.as_mut() else {
            return Err(PartsError::NotBegun);
        };
        let announced = *announced;
        payload.extend_from_slice(&part.payload);
        let got = payload.len() as u64;
        if got > announced || (part.last && got != announced) {
            self.partial = None;
            return Err(PartsError::WrongLength { announced, got });
        }
        if !part.last {
            return Ok(None);
        }
        let payload = self.partial.take().map(|(p, _)| p).unwrap_or_default();
        Ok(Some(Envelope {
            payload: Bytes::from(payload),
            signature: part.signature,
            key_id: part.key_id,
        }))
    }

    /// Drops an incomplete update (a whole one arrived instead).
    pub fn reset(&mut self) {
        self.partial = None;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::v1::control_message::Msg;

    fn envelope(len: usize) -> Envelope {
        Envelope {
            payload: Bytes::from((0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>()),
            signature: vec![7; 64],
            key_id: "k1".into(),
        }
    }

    fn parts(msgs: Vec<Msg>) -> Vec<UpdatePart> {
        msgs.into_iter()
            .map(|m| match m {
                Msg::UpdatePart(p) => p,
                other => panic!("not a part: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn an_announced_length_beyond_any_snapshot_is_refused() {
        let mut joiner = Joiner::default();
        let part = UpdatePart {
            payload: Bytes::from_static(b"x"),
            payload_len: MAX_UPDATE_BYTES + 1,
            ..UpdatePart::default()
        };
        assert_eq!(
            joiner.push(part),
            Err(PartsError::TooLarge(MAX_UPDATE_BYTES + 1))
        );
        assert!(joiner.partial.is_none());
    }

    #[test]
    fn a_small_update_goes_whole() {
        let msgs = update_messages(envelope(10), 10);
        assert!(matches!(&msgs[..], [Msg::Update(e)] if *e == envelope(10)));
    }

    #[test]
    fn a_large_update_goes_in_parts_and_joins_back() {
        let sent = envelope(25);
        let parts = parts(update_messages(sent.clone(), 10));
        let sizes: Vec<usize> = parts.iter().map(|p| p.payload.len()).collect();
        assert_eq!(sizes, [10, 10, 5]);
        assert_eq!(
            parts.iter().map(|p| p.payload_len).collect::<Vec<_>>(),
            [25, 0, 0]
        );
        // Only the last part is signed.
        assert!(parts[..2].iter().all(|p| p.signature.is_empty() && !p.last));
        let mut joiner = Joiner::default();
        let mut joined = None;
        for p in parts {
            assert!(joined.is_none(), "complete before the last part");
            joined = joiner.push(p).unwrap();
        }
        assert_eq!(joined.unwrap(), sent);
    }

    #[test]
    fn a_new_first_part_drops_an_incomplete_update() {
        let mut joiner = Joiner::default();
        let first = parts(update_messages(envelope(30), 10));
        joiner.push(first[0].clone()).unwrap();
        let sent = envelope(15);
        let mut joined = None;
        for p in parts(update_messages(sent.clone(), 10)) {
            joined = joiner.push(p).unwrap();
        }
        assert_eq!(joined.unwrap(), sent);
    }

    #[test]
    fn parts_out_of_sequence_are_refused() {
        let ps = parts(update_messages(envelope(25), 10));
        // No first part.
        let mut joiner = Joiner::default();
        assert_eq!(joiner.push(ps[1].clone()), Err(PartsError::NotBegun));
        // A part missing: the last one arrives short.
        joiner.push(ps[0].clone()).unwrap();
        assert_eq!(
            joiner.push(ps[2].clone()),
            Err(PartsError::WrongLength {
                announced: 25,
                got: 15
            })
        );
        // Nothing kept after an error.
        assert_eq!(joiner.push(ps[1].clone()), Err(PartsError::NotBegun));
        // A part repeated: more than announced.
        joiner.push(ps[0].clone()).unwrap();
        joiner.push(ps[1].clone()).unwrap();
        assert_eq!(
            joiner.push(ps[1].clone()),
            Err(PartsError::WrongLength {
                announced: 25,
                got: 30
            })
        );
    }
}
