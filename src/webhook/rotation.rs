//! When the webhook's generated certificates are renewed: the pure decision, from what the shared
//! Secret holds and the time.
//!
//! The replicas share one CA and one serving certificate through a Secret. Any replica may renew
//! them (writes carry the Secret's resourceVersion, so one wins and the others read its result),
//! and every replica derives the caBundle from the same Secret, so they never disagree on it.
//! Renewal never leaves the apiserver without trust in what is served:
//! - a new CA joins the bundle before anything it signs is served: the serving certificate is
//!   re-issued by it only once it has been in the Secret for [`BUNDLE_SETTLE`] (replicas copy
//!   the bundle into the webhook configuration every few seconds) and the configuration is seen
//!   to hold it, unless the old certificate cannot be served any longer anyway;
//! - a CA stays in the bundle until it expires, so a certificate it signed is trusted to its end.

/// Seconds, Unix time.
pub type Secs = i64;

const DAY: Secs = 86_400;
/// How long a generated CA is valid, and how long before its end it is replaced.
pub const CA_LIFETIME: Secs = 10 * 365 * DAY;
pub const CA_RENEW_BEFORE: Secs = 365 * DAY;
/// How long a serving certificate is valid, and how long before its end it is replaced.
pub const LEAF_LIFETIME: Secs = 365 * DAY;
pub const LEAF_RENEW_BEFORE: Secs = 120 * DAY;
/// How long a new CA is in the bundle before it signs what is served.
pub const BUNDLE_SETTLE: Secs = 5 * 60;
/// Certificates are valid from this long before they are made, so that a clock a little behind
/// (the apiserver's) does not find them not yet valid.
pub const BACKDATE: Secs = 5 * 60;

/// The CA that signs new certificates (the first of the bundle).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaFacts {
    pub subject: String,
    pub not_before: Secs,
    pub not_after: Secs,
}

/// The serving certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeafFacts {
    pub issuer: String,
    pub not_after: Secs,
    /// Its DNS names and IP addresses, sorted.
    pub names: Vec<String>,
}

/// What the Secret holds, as far as renewal cares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// `None`: no CA, or one that does not parse.
    pub ca: Option<CaFacts>,
    /// Whether the CA's key is there (Secrets written before rotation existed lack it).
    pub ca_key: bool,
    pub leaf: Option<LeafFacts>,
    /// Expired CAs still in the bundle.
    pub expired_in_bundle: usize,
    /// Whether the webhook configuration's caBundle holds the current CA.
    pub ca_trusted: bool,
}

/// What to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renewal {
    Keep,
    /// Nothing usable: a new CA and serving certificate.
    Fresh,
    /// A new CA, first in the bundle before the current ones; with `leaf`, a serving certificate
    /// it signs too (the current one is unusable, so there is nothing to wait for).
    NewCa {
        leaf: bool,
    },
    /// A serving certificate signed by the current CA.
    NewLeaf,
    /// The bundle without its expired CAs.
    Prune,
}

/// The renewal due at `now` for certificates that must name `names` (sorted).
pub fn renewal(facts: &Facts, names: &[String], now: Secs) -> Renewal {
    let Some(ca) = &facts.ca else {
        return Renewal::Fresh;
    };
    let leaf_usable = facts
        .leaf
        .as_ref()
        .is_some_and(|l| l.not_after > now && l.names == names);
    if !facts.ca_key || ca.not_after - now < CA_RENEW_BEFORE {
        return Renewal::NewCa { leaf: !leaf_usable };
    }
    let Some(leaf) = facts.leaf.as_ref().filter(|_| leaf_usable) else {
        return Renewal::NewLeaf;
    };
    let settled = now - (ca.not_before + BACKDATE) >= BUNDLE_SETTLE && facts.ca_trusted;
    let old_issuer = leaf.issuer != ca.subject;
    if leaf.not_after - now < LEAF_RENEW_BEFORE || (old_issuer && settled) {
        return if old_issuer && !settled {
            // Due, but the new CA may not be trusted everywhere yet: served meanwhile is the
            // current certificate, still valid.
            Renewal::Keep
        } else {
            Renewal::NewLeaf
        };
    }
    if facts.expired_in_bundle > 0 {
        return Renewal::Prune;
    }
    Renewal::Keep
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Secs = 2_000_000_000;

    fn names() -> Vec<String> {
        vec!["svcplane-webhook.kube-system.svc".to_owned()]
    }

    fn healthy() -> Facts {
        Facts {
            ca: Some(CaFacts {
                subject: "CN=ca-1".into(),
                not_before: NOW - 100 * DAY,
                not_after: NOW + 5 * 365 * DAY,
            }),
            ca_key: true,
            leaf: Some(LeafFacts {
                issuer: "CN=ca-1".into(),
                not_after: NOW + 200 * DAY,
                names: names(),
            }),
            expired_in_bundle: 0,
            ca_trusted: true,
        }
    }

    #[test]
    fn current_certificates_are_kept() {
        assert_eq!(renewal(&healthy(), &names(), NOW), Renewal::Keep);
    }

    #[test]
    fn nothing_or_an_unreadable_ca_starts_afresh() {
        assert_eq!(renewal(&Facts::default(), &names(), NOW), Renewal::Fresh);
        let f = Facts {
            ca: None,
            ..healthy()
        };
        assert_eq!(renewal(&f, &names(), NOW), Renewal::Fresh);
    }

    #[test]
    fn a_serving_certificate_is_renewed_before_its_end_or_when_the_names_change() {
        let mut f = healthy();
        f.leaf.as_mut().unwrap().not_after = NOW + LEAF_RENEW_BEFORE - 1;
        assert_eq!(renewal(&f, &names(), NOW), Renewal::NewLeaf);
        let other = vec!["elsewhere.svc".to_owned()];
        assert_eq!(renewal(&healthy(), &other, NOW), Renewal::NewLeaf);
        let mut expired = healthy();
        expired.leaf.as_mut().unwrap().not_after = NOW;
        assert_eq!(renewal(&expired, &names(), NOW), Renewal::NewLeaf);
    }

    #[test]
    fn a_ca_near_its_end_or_without_its_key_is_replaced_keeping_a_usable_leaf() {
        let mut f = healthy();
        f.ca.as_mut().unwrap().not_after = NOW + CA_RENEW_BEFORE - 1;
        assert_eq!(renewal(&f, &names(), NOW), Renewal::NewCa { leaf: false });
        let legacy = Facts {
            ca_key: false,
            ..healthy()
        };
        assert_eq!(renewal(&legacy, &names(), NOW), Renewal::NewCa { leaf: false });
        let mut unusable = legacy;
        unusable.leaf = None;
        assert_eq!(renewal(&unusable, &names(), NOW), Renewal::NewCa { leaf: true });
    }

    #[test]
    fn a_new_ca_signs_the_served_certificate_only_once_it_has_settled_in_the_bundle() {
        // Just rotated: the CA is new, the leaf still from the previous one.
        let mut f = healthy();
        f.ca = Some(CaFacts {
            subject: "CN=ca-2".into(),
            not_before: NOW - BACKDATE,
            not_after: NOW + CA_LIFETIME,
        });
        assert_eq!(renewal(&f, &names(), NOW + BUNDLE_SETTLE - 1), Renewal::Keep);
        assert_eq!(renewal(&f, &names(), NOW + BUNDLE_SETTLE), Renewal::NewLeaf);
        // Not in the configuration's bundle yet (an older replica writes its own): wait.
        let untrusted = Facts {
            ca_trusted: false,
            ..f.clone()
        };
        assert_eq!(renewal(&untrusted, &names(), NOW + BUNDLE_SETTLE), Renewal::Keep);
        // Near its end too: still waits while it can be served.
        f.leaf.as_mut().unwrap().not_after = NOW + 60;
        assert_eq!(renewal(&f, &names(), NOW + 30), Renewal::Keep);
        // Expired: nothing to wait for.
        assert_eq!(renewal(&f, &names(), NOW + 60), Renewal::NewLeaf);
    }

    #[test]
    fn expired_cas_leave_the_bundle() {
        let f = Facts {
            expired_in_bundle: 1,
            ..healthy()
        };
        assert_eq!(renewal(&f, &names(), NOW), Renewal::Prune);
    }
}
