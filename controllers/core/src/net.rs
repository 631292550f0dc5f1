//! IP families and port protocols, one type each for every crate.

use std::net::IpAddr;

/// An IP family, spelled as Kubernetes spells it (`spec.ipFamilies`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    IPv4,
    IPv6,
}

impl IpFamily {
    pub fn of(ip: &IpAddr) -> Self {
        if ip.is_ipv6() { Self::IPv6 } else { Self::IPv4 }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::IPv4 => "IPv4",
            Self::IPv6 => "IPv6",
        }
    }

    /// The API's spelling; anything else is not a family.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "IPv4" => Some(Self::IPv4),
            "IPv6" => Some(Self::IPv6),
            _ => None,
        }
    }

    pub fn other(self) -> Self {
        match self {
            Self::IPv4 => Self::IPv6,
            Self::IPv6 => Self::IPv4,
        }
    }
}

/// A port's protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The API's spelling; an unset protocol is TCP, as the apiserver defaults it.
    pub fn parse(s: Option<&str>) -> Option<Self> {
        match s.unwrap_or(crate::wellknown::DEFAULT_PROTOCOL) {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }

    /// Lower case, as nftables and kube-proxy's rule names spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_and_protocols_read_the_apis_spelling() {
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(IpFamily::of(&v6), IpFamily::IPv6);
        assert_eq!(IpFamily::parse("IPv4"), Some(IpFamily::IPv4));
        assert_eq!(IpFamily::parse("ipv4"), None);
        assert_eq!(IpFamily::IPv4.other().as_str(), "IPv6");
        assert_eq!(Protocol::parse(None), Some(Protocol::Tcp));
        assert_eq!(Protocol::parse(Some("SCTP")).map(Protocol::as_str), Some("sctp"));
        assert_eq!(Protocol::parse(Some("tcp")), None);
    }
}
