//! Decoding a stored bitmap from arbitrary bytes: never panics, and whatever decodes re-encodes
//! to a document that decodes to the same allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use svcplane_allocators::{IpRange, PortRange, stored};

fuzz_target!(|data: &[u8]| {
    let ips: IpRange = "10.96.0.0/20".parse().expect("valid range");
    if let Ok(a) = stored::decode(data, &ips) {
        assert_eq!(stored::decode(&stored::encode(&a), &ips).ok(), Some(a));
    }
    let ports: PortRange = "30000-32767".parse().expect("valid range");
    if let Ok(a) = stored::decode(data, &ports) {
        assert_eq!(stored::decode(&stored::encode(&a), &ports).ok(), Some(a));
    }
});
