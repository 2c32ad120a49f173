//! `Instant`s in serialized state (a reexec's hand-over), as `CLOCK_MONOTONIC`
//! microseconds: the clock `Instant` reads on Linux, and one that both images of
//! the same process share, so deadlines carry over exactly.

use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer, Serializer};

fn to_mono(t: Instant) -> i64 {
    let (now, mono) = (Instant::now(), crate::sys::monotonic_usec() as i64);
    if t >= now {
        mono + (t - now).as_micros().min(i64::MAX as u128 / 2) as i64
    } else {
        mono - (now - t).as_micros().min(i64::MAX as u128 / 2) as i64
    }
}

fn from_mono(v: i64) -> Instant {
    let (now, mono) = (Instant::now(), crate::sys::monotonic_usec() as i64);
    let d = Duration::from_micros(v.abs_diff(mono));
    if v >= mono {
        now.checked_add(d).unwrap_or(now)
    } else {
        now.checked_sub(d).unwrap_or(now)
    }
}

/// The machine's times across a reexec, as `CLOCK_MONOTONIC` microseconds.
pub struct Mono;

impl baton_machine::MonoClock for Mono {
    fn micros(&self, t: Instant) -> i64 {
        to_mono(t)
    }

    fn instant(&self, v: i64) -> Instant {
        from_mono(v)
    }
}

/// `#[serde(with = "crate::clock")]` for an `Instant`.
pub fn serialize<S: Serializer>(t: &Instant, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_i64(to_mono(*t))
}

/// See [`serialize`].
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Instant, D::Error> {
    i64::deserialize(d).map(from_mono)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_round_trip_within_a_millisecond() {
        let now = Instant::now();
        for t in [
            now,
            now + Duration::from_secs(30),
            now - Duration::from_millis(1500),
        ] {
            let back = from_mono(to_mono(t));
            let diff = if back > t { back - t } else { t - back };
            assert!(diff < Duration::from_millis(1), "{diff:?}");
        }
    }
}
