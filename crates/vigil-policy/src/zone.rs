//! UTC offsets of IANA zones, cached per (zone, hour) in a small lock-free table
//! shared by every policy: a zone's offset changes a few times a year, and
//! almost every request in an hour asks about the same hour.

use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{Offset, TimeZone};
use chrono_tz::Tz;

const SLOTS: usize = 4096;
const HOUR_BIAS: i64 = 1 << 29;
const OFFSET_BIAS: i64 = 1 << 23;

/// Each slot packs zone (10 bits) | hour + bias (30 bits) | offset + bias (24 bits).
/// An all-zero slot decodes to an hour that is never cached, so it never matches.
static CACHE: [AtomicU64; SLOTS] = [const { AtomicU64::new(0) }; SLOTS];

fn exact(tz: Tz, utc: i64) -> Option<i32> {
    let t = chrono::DateTime::from_timestamp(utc, 0)?.naive_utc();
    Some(tz.offset_from_utc_datetime(&t).fix().local_minus_utc())
}

fn pack(zone: u64, hour: i64, offset: i32) -> Option<u64> {
    let h = u64::try_from(hour + HOUR_BIAS)
        .ok()
        .filter(|h| *h > 0 && *h < (1 << 30))?;
    let o = u64::try_from(i64::from(offset) + OFFSET_BIAS)
        .ok()
        .filter(|o| *o < (1 << 24))?;
    Some(zone << 54 | h << 24 | o)
}

/// The zone's UTC offset in seconds at the Unix instant `utc`.
pub fn offset(tz: Tz, utc: i64) -> Option<i32> {
    let zone = tz as u64;
    let hour = utc.div_euclid(3600);
    if zone >= 1024 {
        return exact(tz, utc);
    }
    let slot = &CACHE[(zone as usize).wrapping_mul(31).wrapping_add(hour as usize) % SLOTS];
    let v = slot.load(Ordering::Relaxed);
    if v >> 54 == zone && ((v >> 24) & ((1 << 30) - 1)) as i64 - HOUR_BIAS == hour && v != 0 {
        return Some(((v & ((1 << 24) - 1)) as i64 - OFFSET_BIAS) as i32);
    }
    let off = exact(tz, utc)?;
    // Cache only an hour with one offset throughout (transitions fall inside some hours).
    let start = hour * 3600;
    if exact(tz, start) == Some(off) && exact(tz, start + 3599) == Some(off) {
        if let Some(packed) = pack(zone, hour, off) {
            slot.store(packed, Ordering::Relaxed);
        }
    }
    Some(off)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_offsets_match_chrono_across_transitions() {
        let zones = [
            Tz::UTC,
            Tz::Europe__Paris,
            Tz::Australia__Lord_Howe,
            Tz::America__St_Johns,
            Tz::Asia__Kathmandu,
        ];
        // Every 7 minutes across two years, twice (cold then warm cache).
        for _ in 0..2 {
            for tz in zones {
                let mut t = 1_767_225_600 - 86_400 * 365;
                while t < 1_767_225_600 + 86_400 * 365 {
                    assert_eq!(offset(tz, t), exact(tz, t), "{tz} at {t}");
                    t += 420;
                }
            }
        }
        // Before the epoch and at the ends of time.
        assert_eq!(
            offset(Tz::Europe__Paris, -1_000_000_000),
            exact(Tz::Europe__Paris, -1_000_000_000)
        );
        assert_eq!(offset(Tz::UTC, i64::MAX), None);
    }
}
