//! Service ranges as bitmaps see them: which offsets exist, what address or port each one is,
//! and the static band reserved for values users choose.

use std::{fmt, net::IpAddr, str::FromStr};

use ipnet::IpNet;

/// The largest range a bitmap covers, as kube-apiserver limits `--service-cluster-ip-range`:
/// 20 host bits (IPv4 /12, IPv6 /108).
pub const MAX_HOST_BITS: u8 = 20;
/// IPv6 bitmaps are capped at this many entries (upstream's cap).
pub const MAX_IPV6_ENTRIES: u64 = 65_536;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RangeError {
    #[error("{0:?} is not a CIDR")]
    NotCidr(String),
    #[error("{cidr} is not a network address (did you mean {network}?)")]
    NotNetwork { cidr: String, network: String },
    #[error("{cidr} is too large: the prefix must be at least /{min} for {family}")]
    TooLarge {
        cidr: String,
        min: u8,
        family: &'static str,
    },
    #[error("{cidr} is too small to hold any address")]
    TooSmall { cidr: String },
    #[error("{0:?} is not a port range like 30000-32767")]
    NotPortRange(String),
    #[error("port range {0} is empty or includes port 0")]
    BadPorts(String),
}

/// A value that does not belong to a range.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[error("{value} is not in the range {range}")]
pub struct NotInRange {
    pub value: String,
    pub range: String,
}

/// What the allocator needs from a range of IPs or ports.
pub trait Range: fmt::Display {
    type Value: Copy + fmt::Display + Eq;
    /// Number of offsets (the bitmap's length).
    fn size(&self) -> u64;
    fn offset_of(&self, value: Self::Value) -> Result<u64, NotInRange>;
    fn value_at(&self, offset: u64) -> Option<Self::Value>;
    /// Offsets `[0, band)` are reserved for values users choose; dynamic allocation prefers the rest.
    fn static_band(&self) -> u64;
}

/// An IPv4 or IPv6 service CIDR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpRange {
    net: IpNet,
    /// The first allocatable address (the network address + 1).
    base: u128,
    size: u64,
}

impl IpRange {
    pub fn new(net: IpNet) -> Result<Self, RangeError> {
        let cidr = net.to_string();
        if net.trunc() != net {
            return Err(RangeError::NotNetwork {
                cidr,
                network: net.trunc().to_string(),
            });
        }
        let host_bits = net.max_prefix_len() - net.prefix_len();
        let family = if net.addr().is_ipv4() { "IPv4" } else { "IPv6" };
        if host_bits > MAX_HOST_BITS {
            return Err(RangeError::TooLarge {
                cidr,
                min: net.max_prefix_len() - MAX_HOST_BITS,
                family,
            });
        }
        let whole = 1u64 << host_bits;
        // IPv4 loses the network and broadcast addresses; IPv6 only the network address (the
        // "broadcast" is an ordinary address there) and is capped.
        let size = match net {
            IpNet::V4(_) => whole.saturating_sub(2),
            IpNet::V6(_) => whole.min(MAX_IPV6_ENTRIES).saturating_sub(1),
        };
        if size == 0 {
            return Err(RangeError::TooSmall { cidr });
        }
        Ok(Self {
            base: to_u128(net.network()) + 1,
            net,
            size,
        })
    }

    pub fn net(&self) -> IpNet {
        self.net
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.offset_of(ip).is_ok()
    }

    pub fn is_ipv6(&self) -> bool {
        matches!(self.net, IpNet::V6(_))
    }
}

impl FromStr for IpRange {
    type Err = RangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let net: IpNet = s.trim().parse().map_err(|_| RangeError::NotCidr(s.to_owned()))?;
        Self::new(net)
    }
}

impl fmt::Display for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.net.fmt(f)
    }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

impl Range for IpRange {
    type Value = IpAddr;

    fn size(&self) -> u64 {
        self.size
    }

    fn offset_of(&self, ip: IpAddr) -> Result<u64, NotInRange> {
        let not_in = || NotInRange {
            value: ip.to_string(),
            range: self.to_string(),
        };
        if ip.is_ipv4() != self.net.addr().is_ipv4() {
            return Err(not_in());
        }
        let v = to_u128(ip);
        v.checked_sub(self.base)
            .and_then(|o| u64::try_from(o).ok())
            .filter(|o| *o < self.size)
            .ok_or_else(not_in)
    }

    fn value_at(&self, offset: u64) -> Option<IpAddr> {
        if offset >= self.size {
            return None;
        }
        let v = self.base + u128::from(offset);
        Some(match self.net {
            IpNet::V4(_) => IpAddr::V4(u32::try_from(v).ok()?.into()),
            IpNet::V6(_) => IpAddr::V6(v.into()),
        })
    }

    /// KEP-3070: `min(max(16, cidr size / 16), 256)`, none for ranges of 16 addresses or fewer;
    /// the CIDR's whole size counts, not its allocatable addresses.
    fn static_band(&self) -> u64 {
        let whole = 1u64 << (self.net.max_prefix_len() - self.net.prefix_len());
        if whole <= 16 {
            0
        } else {
            (whole / 16).clamp(16, 256)
        }
    }
}

/// A NodePort range such as `30000-32767` (both ends included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub base: u16,
    pub size: u32,
}

impl FromStr for PortRange {
    type Err = RangeError;

    /// `first-last`, or `first+count` as kube-apiserver also accepts.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || RangeError::NotPortRange(s.to_owned());
        let s = s.trim();
        let (base, last) = if let Some((a, b)) = s.split_once('-') {
            let a: u16 = a.trim().parse().map_err(|_| bad())?;
            let b: u16 = b.trim().parse().map_err(|_| bad())?;
            (a, b)
        } else if let Some((a, n)) = s.split_once('+') {
            let a: u16 = a.trim().parse().map_err(|_| bad())?;
            let n: u16 = n.trim().parse().map_err(|_| bad())?;
            (a, a.checked_add(n).ok_or_else(bad)?)
        } else {
            return Err(bad());
        };
        if base == 0 || last < base {
            return Err(RangeError::BadPorts(s.to_owned()));
        }
        Ok(Self {
            base,
            size: u32::from(last - base) + 1,
        })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.base, u32::from(self.base) + self.size - 1)
    }
}

impl Range for PortRange {
    type Value = u16;

    fn size(&self) -> u64 {
        u64::from(self.size)
    }

    fn offset_of(&self, port: u16) -> Result<u64, NotInRange> {
        u32::from(port)
            .checked_sub(u32::from(self.base))
            .filter(|o| *o < self.size)
            .map(u64::from)
            .ok_or_else(|| NotInRange {
                value: port.to_string(),
                range: self.to_string(),
            })
    }

    fn value_at(&self, offset: u64) -> Option<u16> {
        let o = u32::try_from(offset).ok().filter(|o| *o < self.size)?;
        u16::try_from(u32::from(self.base) + o).ok()
    }

    /// KEP-3668: `min(max(16, size / 32), 128)`, none for ranges of 16 ports or fewer.
    fn static_band(&self) -> u64 {
        let size = u64::from(self.size);
        if size <= 16 { 0 } else { (size / 32).clamp(16, 128) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_sizes_bands_and_limits() {
        for (cidr, size, band) in [
            ("10.96.0.0/28", 14, 0),
            ("10.96.0.0/27", 30, 16),
            ("10.96.0.0/24", 254, 16),
            ("10.96.0.0/20", 4094, 256),
            ("10.96.0.0/16", 65_534, 256),
            ("10.96.0.0/12", 1_048_574, 256),
            ("10.96.0.0/30", 2, 0),
        ] {
            let r: IpRange = cidr.parse().unwrap();
            assert_eq!((r.size(), r.static_band()), (size, band), "{cidr}");
        }
        assert!(matches!(
            "10.0.0.0/11".parse::<IpRange>(),
            Err(RangeError::TooLarge { min: 12, .. })
        ));
        assert!(matches!(
            "10.0.0.0/31".parse::<IpRange>(),
            Err(RangeError::TooSmall { .. })
        ));
        assert!(matches!(
            "10.96.0.1/24".parse::<IpRange>(),
            Err(RangeError::NotNetwork { .. })
        ));
        assert!(matches!("banana".parse::<IpRange>(), Err(RangeError::NotCidr(_))));
    }

    #[test]
    fn ipv4_offsets_skip_network_and_broadcast() {
        let r: IpRange = "10.96.0.0/24".parse().unwrap();
        assert_eq!(r.offset_of(ip("10.96.0.1")), Ok(0));
        assert_eq!(r.offset_of(ip("10.96.0.254")), Ok(253));
        assert!(r.offset_of(ip("10.96.0.0")).is_err());
        assert!(r.offset_of(ip("10.96.0.255")).is_err());
        assert!(r.offset_of(ip("10.96.1.1")).is_err());
        assert!(r.offset_of(ip("fd00::1")).is_err(), "other family");
        assert_eq!(r.value_at(0), Some(ip("10.96.0.1")));
        assert_eq!(r.value_at(254), None);
        let err = r.offset_of(ip("10.97.0.1")).unwrap_err();
        assert_eq!(err.to_string(), "10.97.0.1 is not in the range 10.96.0.0/24");
    }

    #[test]
    fn ipv6_sizes_caps_and_offsets() {
        for (cidr, size, band) in [
            ("fd00::/124", 15, 0),
            ("fd00::/120", 255, 16),
            ("fd00::/112", 65_535, 256),
            ("fd00::/108", 65_535, 256),
            ("fd00::/127", 1, 0),
        ] {
            let r: IpRange = cidr.parse().unwrap();
            assert_eq!((r.size(), r.static_band()), (size, band), "{cidr}");
        }
        assert!(matches!(
            "fd00::/107".parse::<IpRange>(),
            Err(RangeError::TooLarge { min: 108, .. })
        ));
        assert!(matches!(
            "fd00::/128".parse::<IpRange>(),
            Err(RangeError::TooSmall { .. })
        ));
        let r: IpRange = "fd00:10:96::/112".parse().unwrap();
        assert_eq!(r.offset_of(ip("fd00:10:96::1")), Ok(0));
        assert_eq!(
            r.offset_of(ip("fd00:10:96::ffff")),
            Ok(65_534),
            "the last address is usable in IPv6"
        );
        assert!(r.offset_of(ip("fd00:10:96::")).is_err());
        let big: IpRange = "fd00::/108".parse().unwrap();
        assert!(
            big.offset_of(ip("fd00::1:0")).is_err(),
            "beyond the 65536-entry cap"
        );
    }

    #[test]
    fn port_ranges() {
        let r: PortRange = "30000-32767".parse().unwrap();
        assert_eq!((r.size(), r.static_band()), (2768, 86));
        assert_eq!(r.to_string(), "30000-32767");
        assert_eq!(r.offset_of(30000), Ok(0));
        assert_eq!(r.offset_of(32767), Ok(2767));
        assert!(r.offset_of(29999).is_err() && r.offset_of(32768).is_err());
        assert_eq!(r.value_at(86), Some(30086));
        assert_eq!(
            "30000+99".parse::<PortRange>().unwrap().to_string(),
            "30000-30099"
        );
        assert_eq!("100-115".parse::<PortRange>().unwrap().static_band(), 0);
        assert_eq!("100-116".parse::<PortRange>().unwrap().static_band(), 16);
        assert_eq!("1-65535".parse::<PortRange>().unwrap().static_band(), 128);
        for bad in ["", "30000", "a-b", "0-10", "20-10", "65535+1"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn ipv4_offsets_round_trip(prefix in 12u8..=30, net in any::<u32>(), off in any::<u64>()) {
            let n = ipnet::Ipv4Net::new(net.into(), prefix).unwrap().trunc();
            let r = IpRange::new(IpNet::V4(n)).unwrap();
            let off = off % r.size();
            let v = r.value_at(off).unwrap();
            prop_assert_eq!(r.offset_of(v), Ok(off));
            prop_assert!(IpNet::V4(n).contains(&v) && v != IpAddr::V4(n.network()) && v != IpAddr::V4(n.broadcast()));
        }

        #[test]
        fn ipv6_offsets_round_trip(prefix in 108u8..=127, net in any::<u128>(), off in any::<u64>()) {
            let n = ipnet::Ipv6Net::new(net.into(), prefix).unwrap().trunc();
            let r = IpRange::new(IpNet::V6(n)).unwrap();
            let off = off % r.size();
            let v = r.value_at(off).unwrap();
            prop_assert_eq!(r.offset_of(v), Ok(off));
            prop_assert!(IpNet::V6(n).contains(&v) && v != IpAddr::V6(n.network()));
        }
    }
}
