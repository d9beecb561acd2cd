//! The control plane's one way of writing and reading instants: RFC 3339 in UTC
//! (`…Z`), to the second for documents, to the millisecond for record metadata and
//! the fleet view.

use chrono::{DateTime, SecondsFormat, Utc};

/// `t` to the second, as documents store it.
pub(crate) fn secs(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// `t` to the millisecond.
pub(crate) fn millis(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Unix seconds as a document time; `None` out of range.
pub(crate) fn from_unix(secs_since_epoch: i64) -> Option<String> {
    DateTime::from_timestamp(secs_since_epoch, 0).map(secs)
}

/// Unix milliseconds to the millisecond (empty out of range).
pub(crate) fn from_unix_millis(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .map(millis)
        .unwrap_or_default()
}

/// An RFC 3339 instant, in UTC.
pub(crate) fn parse(t: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(t)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// An RFC 3339 instant as Unix seconds.
pub(crate) fn unix(t: &str) -> Option<i64> {
    parse(t).map(|t| t.timestamp())
}

/// Serde for instants kept to the millisecond (`#[serde(with = "crate::time::as_millis")]`).
pub(crate) mod as_millis {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::millis(*t))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(d)?;
        super::parse(&text).ok_or_else(|| serde::de::Error::custom("not an RFC 3339 time"))
    }
}
