//! What the proxy reads from a client certificate that the TLS handshake verified:
//! the SHA-256 of its SubjectPublicKeyInfo (the identity devices and service
//! accounts are registered under) and its issuer's distinguished name in RFC 4514
//! form (for `client_certificate/issuer` criteria). Read once per connection and
//! shared by every request on it.

use vigil_policy::request::ClientCertificate;

/// A connection's verified client certificate, as requests read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// SHA-256 of the leaf's DER SubjectPublicKeyInfo.
    pub spki_sha256: [u8; 32],
    /// The leaf's issuer, RFC 4514 (`CN=Device CA,O=Example`).
    pub issuer: String,
}

impl ClientCert {
    /// Reads a DER certificate (already verified, so well-formed; anything that is
    /// not is refused rather than guessed at).
    pub fn from_der(der: &[u8]) -> Result<ClientCert, String> {
        let bad = |what: &str| format!("the client certificate is malformed ({what})");
        let (tag, cert, _) = tlv(der).ok_or_else(|| bad("certificate"))?;
        if tag != SEQUENCE {
            return Err(bad("certificate"));
        }
        let (tag, tbs, _) = tlv(cert).ok_or_else(|| bad("tbsCertificate"))?;
        if tag != SEQUENCE {
            return Err(bad("tbsCertificate"));
        }
        // version [0] (optional), serialNumber, signature, issuer, validity,
        // subject, subjectPublicKeyInfo.
        let (first, _, mut rest) = tlv(tbs).ok_or_else(|| bad("version"))?;
        if first == 0xa0 {
            (_, _, rest) = tlv(rest).ok_or_else(|| bad("serial"))?;
        }
        let (_, _, after_signature) = tlv(rest).ok_or_else(|| bad("signature"))?;
        let (tag, issuer, after_issuer) = tlv(after_signature).ok_or_else(|| bad("issuer"))?;
        if tag != SEQUENCE {
            return Err(bad("issuer"));
        }
        let (_, _, after_validity) = tlv(after_issuer).ok_or_else(|| bad("validity"))?;
        let (_, _, after_subject) = tlv(after_validity).ok_or_else(|| bad("subject"))?;
        let (tag, _, after_spki) = tlv(after_subject).ok_or_else(|| bad("public key"))?;
        if tag != SEQUENCE {
            return Err(bad("public key"));
        }
        let spki = &after_subject[..after_subject.len() - after_spki.len()];
        let digest = ring::digest::digest(&ring::digest::SHA256, spki);
        let mut spki_sha256 = [0u8; 32];
        spki_sha256.copy_from_slice(digest.as_ref());
        Ok(ClientCert {
            spki_sha256,
            issuer: rfc4514(issuer).ok_or_else(|| bad("issuer name"))?,
        })
    }

    /// The certificate as the policy reads it.
    pub fn facts(&self) -> ClientCertificate<'_> {
        ClientCertificate {
            spki_sha256: self.spki_sha256,
            issuer: &self.issuer,
        }
    }
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;

/// One DER element: its tag, its contents and what follows it. Only the forms
/// certificates use: one-byte tags, definite lengths of up to four bytes.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The short names RFC 4514 (section 3) gives attribute types, by DER OID.
const SHORT_NAMES: &[(&[u8], &str)] = &[
    (&[0x55, 0x04, 0x03], "CN"),
    (&[0x55, 0x04, 0x07], "L"),
    (&[0x55, 0x04, 0x08], "ST"),
    (&[0x55, 0x04, 0x0a], "O"),
    (&[0x55, 0x04, 0x0b], "OU"),
    (&[0x55, 0x04, 0x06], "C"),
    (&[0x55, 0x04, 0x09], "STREET"),
    (
        &[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19],
        "DC",
    ),
    (
        &[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01],
        "UID",
    ),
];

/// A distinguished name (the contents of its `SEQUENCE`) in RFC 4514 form: the
/// RDNs last to first, joined by `,`; several attributes of one RDN joined by `+`;
/// types by their short name or dotted OID; string values escaped, others (and
/// every value of a type without a short name) as `#` and the hex of their DER.
pub fn rfc4514(mut name: &[u8]) -> Option<String> {
    let mut rdns = Vec::new();
    while !name.is_empty() {
        let (tag, mut set, rest) = tlv(name)?;
        if tag != SET {
            return None;
        }
        name = rest;
        let mut attributes = Vec::new();
        while !set.is_empty() {
            let (tag, pair, rest) = tlv(set)?;
            if tag != SEQUENCE {
                return None;
            }
            set = rest;
            let (tag, oid, value) = tlv(pair)?;
            if tag != OID {
                return None;
            }
            let short = SHORT_NAMES.iter().find(|(o, _)| *o == oid).map(|(_, n)| *n);
            let (value_tag, contents, trailing) = tlv(value)?;
            if !trailing.is_empty() {
                return None;
            }
            let text = short.and_then(|_| string_value(value_tag, contents));
            let value = match text {
                Some(t) => escape(&t),
                None => format!("#{}", vigil_policy::to_hex(value)),
            };
            let ty = match short {
                Some(s) => s.to_owned(),
                None => dotted(oid)?,
            };
            attributes.push(format!("{ty}={value}"));
        }
        rdns.push(attributes.join("+"));
    }
    rdns.reverse();
    Some(rdns.join(","))
}

/// A directory string's text, for the string types that carry Unicode.
fn string_value(tag: u8, contents: &[u8]) -> Option<String> {
    match tag {
        // UTF8String, PrintableString, IA5String, NumericString.
        0x0c | 0x13 | 0x16 | 0x12 => String::from_utf8(contents.to_vec()).ok(),
        // BMPString (UCS-2, big-endian).
        0x1e if contents.len() % 2 == 0 => {
            let units: Vec<u16> = contents
                .chunks(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units).ok()
        }
        // UniversalString (UCS-4, big-endian).
        0x1c if contents.len() % 4 == 0 => contents
            .chunks(4)
            .map(|c| char::from_u32(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        _ => None,
    }
}

/// RFC 4514 section 2.4: `"+,;<>\` always, `#` and space at the start, space at
/// the end, NUL as `\00`.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '#' | ' ' if i == 0 => {
                out.push('\\');
                out.push(c);
            }
            ' ' if i == last => out.push_str("\\ "),
            '\0' => out.push_str("\\00"),
            c => out.push(c),
        }
    }
    out
}

/// An OID's dotted-decimal form.
fn dotted(oid: &[u8]) -> Option<String> {
    let mut arcs: Vec<u64> = Vec::new();
    let mut current: u64 = 0;
    for (i, b) in oid.iter().enumerate() {
        if current > (u64::MAX >> 7) {
            return None;
        }
        current = (current << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (current / 40).min(2);
                arcs.push(first);
                arcs.push(current - first * 40);
            } else {
                arcs.push(current);
            }
            current = 0;
        } else if i == oid.len() - 1 {
            return None;
        }
    }
    if arcs.is_empty() {
        return None;
    }
    Some(
        arcs.iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join("."),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn der(tag: u8, contents: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        if contents.len() < 0x80 {
            out.push(contents.len() as u8);
        } else {
            out.push(0x82);
            out.extend_from_slice(&(contents.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(contents);
        out
    }

    fn attribute(oid: &[u8], tag: u8, value: &[u8]) -> Vec<u8> {
        der(SEQUENCE, &[der(OID, oid), der(tag, value)].concat())
    }

    fn rdn(attributes: &[Vec<u8>]) -> Vec<u8> {
        der(SET, &attributes.concat())
    }

    #[test]
    fn names_read_last_rdn_first_with_short_names() {
        let name = [
            rdn(&[attribute(&[0x55, 0x04, 0x06], 0x13, b"DE")]),
            rdn(&[attribute(&[0x55, 0x04, 0x0a], 0x0c, b"Example, Inc.")]),
            rdn(&[
                attribute(&[0x55, 0x04, 0x03], 0x0c, b"Device CA"),
                attribute(&[0x55, 0x04, 0x0b], 0x0c, b"IT"),
            ]),
        ]
        .concat();
        assert_eq!(
            rfc4514(&name).unwrap(),
            "CN=Device CA+OU=IT,O=Example\\, Inc.,C=DE"
        );
        assert_eq!(rfc4514(&[]).unwrap(), "");
    }

    #[test]
    fn values_are_escaped_and_unknown_types_are_hex() {
        let name = [
            // emailAddress (1.2.840.113549.1.9.1) has no short name.
            rdn(&[attribute(
                &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01],
                0x16,
                b"a@b",
            )]),
            rdn(&[attribute(&[0x55, 0x04, 0x03], 0x0c, b"#lead trail ")]),
            // BMPString "Zoë".
            rdn(&[attribute(
                &[0x55, 0x04, 0x0a],
                0x1e,
                &[0, b'Z', 0, b'o', 0, 0xeb],
            )]),
        ]
        .concat();
        assert_eq!(
            rfc4514(&name).unwrap(),
            "O=Zoë,CN=\\#lead trail\\ ,1.2.840.113549.1.9.1=#1603614062"
        );
    }

    #[test]
    fn malformed_names_are_refused() {
        assert_eq!(rfc4514(&[0x31, 0x05, 0x30]), None);
        assert_eq!(rfc4514(&[0x30, 0x00]), None);
        assert_eq!(ClientCert::from_der(&[0x30, 0x01, 0x00]).ok(), None);
    }

    #[test]
    fn the_fingerprint_covers_the_public_key_info_only() {
        let issuer = der(
            SEQUENCE,
            &rdn(&[attribute(&[0x55, 0x04, 0x03], 0x0c, b"CA")]),
        );
        let spki = der(
            SEQUENCE,
            &[der(SEQUENCE, &[]), der(0x03, &[0, 1, 2])].concat(),
        );
        let tbs = der(
            SEQUENCE,
            &[
                der(0xa0, &der(0x02, &[2])),
                der(0x02, &[7]),
                der(SEQUENCE, &[]),
                issuer.clone(),
                der(SEQUENCE, &[]),
                der(SEQUENCE, &[]),
                spki.clone(),
            ]
            .concat(),
        );
        let cert = der(
            SEQUENCE,
            &[tbs, der(SEQUENCE, &[]), der(0x03, &[0])].concat(),
        );
        let read = ClientCert::from_der(&cert).unwrap();
        assert_eq!(read.issuer, "CN=CA");
        assert_eq!(
            read.spki_sha256.as_slice(),
            ring::digest::digest(&ring::digest::SHA256, &spki).as_ref()
        );
    }
}
