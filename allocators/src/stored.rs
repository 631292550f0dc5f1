//! The form a range's bitmap takes in etcd: a small JSON document naming the range and carrying
//! the bitmap's byte form (base64). Reading one back checks both, so data of another range is
//! never taken for this one: a mismatch stops allocation rather than resetting anything.

use base64::{Engine, engine::general_purpose::STANDARD};
use serde::{Deserialize, Serialize};

use crate::{
    bitmap::{Bitmap, DecodeError},
    policy::Allocation,
    range::Range,
};

#[derive(Serialize, Deserialize)]
struct Document {
    range: String,
    data: String,
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoredError {
    #[error("stored bitmap is not a valid document: {0}")]
    Malformed(String),
    #[error("stored bitmap belongs to range {stored}, not {expected}")]
    OtherRange { stored: String, expected: String },
    #[error("stored bitmap data is not base64: {0}")]
    BadData(String),
    #[error("stored bitmap does not fit range {range}: {source}")]
    Bits {
        range: String,
        #[source]
        source: DecodeError,
    },
}

pub fn encode<R: Range>(alloc: &Allocation<R>) -> Vec<u8> {
    let doc = Document {
        range: alloc.range().to_string(),
        data: STANDARD.encode(alloc.bitmap().to_bytes()),
    };
    // A struct of two strings always serializes.
    serde_json::to_vec(&doc).unwrap_or_default()
}

/// Reads a stored bitmap for `range`.
pub fn decode<R: Range + Clone>(bytes: &[u8], range: &R) -> Result<Allocation<R>, StoredError> {
    let doc: Document = serde_json::from_slice(bytes).map_err(|e| StoredError::Malformed(e.to_string()))?;
    let expected = range.to_string();
    if doc.range != expected {
        return Err(StoredError::OtherRange {
            stored: doc.range,
            expected,
        });
    }
    let data = STANDARD
        .decode(doc.data.as_bytes())
        .map_err(|e| StoredError::BadData(e.to_string()))?;
    let bitmap = Bitmap::from_bytes(range.size(), &data).map_err(|source| StoredError::Bits {
        range: expected,
        source,
    })?;
    Ok(Allocation::from_bitmap(range.clone(), bitmap))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::range::{IpRange, PortRange};
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_mismatches() {
        let r: PortRange = "30000-32767".parse().unwrap();
        let mut a = Allocation::new(r);
        a.allocate(30000, "port").unwrap();
        a.allocate(32000, "port").unwrap();
        let bytes = encode(&a);
        assert_eq!(decode(&bytes, &r), Ok(a.clone()));
        let other: PortRange = "30000-30100".parse().unwrap();
        assert!(matches!(
            decode(&bytes, &other),
            Err(StoredError::OtherRange { .. })
        ));
        assert!(matches!(decode(b"{}", &r), Err(StoredError::Malformed(_))));
        assert!(matches!(
            decode(br#"{"range":"30000-32767","data":"@@"}"#, &r),
            Err(StoredError::BadData(_))
        ));
        // A bit beyond the range: never silently dropped.
        // 347 bytes hold 2776 bits; the top one is offset 2775, past the range's 2768.
        let mut data = vec![0u8; 347];
        data[0] = 0x80;
        let too_big = format!(r#"{{"range":"30000-32767","data":"{}"}}"#, STANDARD.encode(&data));
        assert!(matches!(
            decode(too_big.as_bytes(), &r),
            Err(StoredError::Bits { .. })
        ));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let r: IpRange = "10.96.0.0/24".parse().unwrap();
            let _ = decode(&bytes, &r);
        }

        #[test]
        fn ip_round_trips(marks in proptest::collection::vec(0u64..65534, 0..300)) {
            let r: IpRange = "10.96.0.0/16".parse().unwrap();
            let mut a = Allocation::new(r.clone());
            for m in marks {
                let ip = r.value_at(m).unwrap();
                let _ = a.allocate(ip, "IP");
            }
            prop_assert_eq!(decode(&encode(&a), &r), Ok(a));
        }
    }
}
