//! `google.protobuf.Timestamp` for the generated code, with serde in
//! protobuf's JSON mapping: RFC 3339 in UTC with a `Z` and 0, 3, 6 or 9
//! fractional digits, as grpcurl prints it. Written here rather than taken
//! from `pbjson-types`, whose `Timestamp` writes the offset as `+00:00`, so
//! that the CLI's `--json` and grpcurl print the same text.

use chrono::{DateTime, SecondsFormat, Utc};

/// A point in time: seconds and nanoseconds since the Unix epoch, UTC.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Message)]
pub struct Timestamp {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

impl From<DateTime<Utc>> for Timestamp {
    fn from(t: DateTime<Utc>) -> Self {
        Timestamp {
            seconds: t.timestamp(),
            // Below 10^9, so it fits.
            nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
        }
    }
}

impl TryFrom<Timestamp> for DateTime<Utc> {
    type Error = &'static str;

    fn try_from(t: Timestamp) -> Result<Self, Self::Error> {
        let nanos = u32::try_from(t.nanos).map_err(|_| "negative nanos")?;
        DateTime::from_timestamp(t.seconds, nanos).ok_or("a time out of range")
    }
}

impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let t = DateTime::<Utc>::try_from(*self).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }
}

impl<'de> serde::Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let t = DateTime::parse_from_rfc3339(&text).map_err(serde::de::Error::custom)?;
        Ok(t.with_timezone(&Utc).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_rfc3339_in_utc_with_a_z_as_grpcurl_prints_it() {
        for (seconds, nanos, text) in [
            (0, 0, "1970-01-01T00:00:00Z"),
            (1_700_000_000, 155_000_000, "2023-11-14T22:13:20.155Z"),
            (1_700_000_000, 155_180_499, "2023-11-14T22:13:20.155180499Z"),
        ] {
            let t = Timestamp { seconds, nanos };
            let json = serde_json::to_value(t).unwrap();
            assert_eq!(json, text);
            assert_eq!(serde_json::from_value::<Timestamp>(json).unwrap(), t);
        }
        assert!(serde_json::to_value(Timestamp {
            seconds: 0,
            nanos: -1
        })
        .is_err());
    }
}
