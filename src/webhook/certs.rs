//! The webhook's serving certificate: from files given by flag (re-read as they are renewed), or
//! generated and shared by every replica through a Secret, so that one `caBundle` trusts them
//! all, and renewed there before it expires ([`super::rotation`] decides when).

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use base64::Engine;
use k8s_openapi::{
    ByteString,
    api::{admissionregistration::v1::MutatingWebhookConfiguration, core::v1::Secret},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use tracing::info;
use x509_parser::{extensions::GeneralName, pem::Pem, prelude::X509Certificate};

use super::rotation::{self, CaFacts, Facts, LeafFacts, Renewal, Secs};

/// PEM-encoded serving material and the CAs the apiserver is to trust.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServingCert {
    /// Every CA that signed a certificate still in use, the current one first.
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// What the shared Secret holds: the serving material and the current CA's key.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stored {
    serving: ServingCert,
    /// Absent from Secrets written before certificates were renewed.
    ca_key_pem: Option<String>,
}

fn now() -> Secs {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| Secs::try_from(d.as_secs()).unwrap_or(Secs::MAX))
}

fn at(secs: Secs) -> anyhow::Result<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp(secs).context("a certificate time out of range")
}

/// A new CA, valid from `now`: its certificate and key. Its name carries the time, so that a
/// certificate's issuer tells which CA signed it.
fn new_ca(now: Secs) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate().context("generating the CA key")?;
    let ca = ca_params(&format!("svcplane-webhook-ca-{now}"), now)?;
    let cert = ca.self_signed(&key).context("signing the CA")?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn ca_params(common_name: &str, now: Secs) -> anyhow::Result<CertificateParams> {
    let mut ca = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name.push(DnType::CommonName, common_name);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = at(now - rotation::BACKDATE)?;
    ca.not_after = at(now + rotation::CA_LIFETIME)?;
    Ok(ca)
}

/// A serving certificate for `names`, signed by the CA `ca_pem` (its first certificate) with
/// `ca_key_pem`, valid from `now` for its lifetime or until the CA ends, whichever is first.
fn new_leaf(ca_pem: &str, ca_key_pem: &str, names: &[String], now: Secs) -> anyhow::Result<(String, String)> {
    let ca_der = pem_certs(ca_pem)
        .into_iter()
        .next()
        .context("no CA certificate")?;
    let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).context("parsing the CA")?;
    let common_name = ca_cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .context("the CA has no common name")?
        .to_owned();
    let ca_not_after = ca_cert.validity().not_after.timestamp();
    let ca_key = KeyPair::from_pem(ca_key_pem).context("parsing the CA key")?;
    // The same name and key as the CA: what the certificate's issuer and signature refer to.
    let issuer = Issuer::new(ca_params(&common_name, now)?, &ca_key);

    let key = KeyPair::generate().context("generating the serving key")?;
    let mut leaf = CertificateParams::new(Vec::<String>::new()).context("serving parameters")?;
    leaf.distinguished_name = DistinguishedName::new();
    leaf.distinguished_name.push(
        DnType::CommonName,
        names.first().map_or("svcplane-webhook", String::as_str),
    );
    leaf.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => n.clone().try_into().map(SanType::DnsName),
        })
        .collect::<Result<_, _>>()
        .context("subject alternative names")?;
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = at(now - rotation::BACKDATE)?;
    leaf.not_after = at((now + rotation::LEAF_LIFETIME).min(ca_not_after))?;
    let cert = leaf
        .signed_by(&key, &issuer)
        .context("signing the serving certificate")?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Generates a CA and a serving certificate for `names` (DNS names or IP addresses).
#[cfg(test)]
pub fn generate(names: &[String]) -> anyhow::Result<ServingCert> {
    Ok(fresh(names, now())?.serving)
}

fn fresh(names: &[String], now: Secs) -> anyhow::Result<Stored> {
    let (ca_pem, ca_key_pem) = new_ca(now)?;
    let (cert_pem, key_pem) = new_leaf(&ca_pem, &ca_key_pem, names, now)?;
    Ok(Stored {
        serving: ServingCert {
            ca_pem,
            cert_pem,
            key_pem,
        },
        ca_key_pem: Some(ca_key_pem),
    })
}

/// The DER of every certificate in a PEM text.
fn pem_certs(pem: &str) -> Vec<Vec<u8>> {
    Pem::iter_from_buffer(pem.as_bytes())
        .filter_map(Result::ok)
        .filter(|p| p.label == "CERTIFICATE")
        .map(|p| p.contents)
        .collect()
}

fn to_pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// The bundle's certificates still valid at `now`, as PEM.
fn unexpired(bundle: &str, now: Secs) -> String {
    pem_certs(bundle)
        .iter()
        .filter(|der| {
            x509_parser::parse_x509_certificate(der)
                .is_ok_and(|(_, c)| c.validity().not_after.timestamp() > now)
        })
        .map(|der| to_pem(der))
        .collect()
}

fn names_of(cert: &X509Certificate<'_>) -> Vec<String> {
    let mut names: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some((*d).to_owned()),
                    GeneralName::IPAddress(b) => match b.len() {
                        4 => <[u8; 4]>::try_from(*b).ok().map(|a| IpAddr::from(a).to_string()),
                        16 => <[u8; 16]>::try_from(*b).ok().map(|a| IpAddr::from(a).to_string()),
                        _ => None,
                    },
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// What renewal needs to know about `stored` at `now`.
fn facts(stored: &Stored, now: Secs) -> Facts {
    let bundle = pem_certs(&stored.serving.ca_pem);
    let parsed: Vec<X509Certificate<'_>> = bundle
        .iter()
        .filter_map(|der| x509_parser::parse_x509_certificate(der).ok().map(|(_, c)| c))
        .collect();
    let ca = parsed.first().map(|c| CaFacts {
        subject: c.subject().to_string(),
        not_before: c.validity().not_before.timestamp(),
        not_after: c.validity().not_after.timestamp(),
    });
    let leaf_der = pem_certs(&stored.serving.cert_pem);
    let leaf = leaf_der
        .first()
        .and_then(|der| x509_parser::parse_x509_certificate(der).ok())
        .map(|(_, c)| LeafFacts {
            issuer: c.issuer().to_string(),
            not_after: c.validity().not_after.timestamp(),
            names: names_of(&c),
        });
    Facts {
        ca,
        ca_key: stored.ca_key_pem.is_some(),
        ca_trusted: true,
        leaf,
        expired_in_bundle: parsed
            .iter()
            .filter(|c| c.validity().not_after.timestamp() <= now)
            .count(),
    }
}

/// `stored` (if any) after `renewal` at `now`.
fn renewed(renewal: Renewal, stored: Option<&Stored>, names: &[String], now: Secs) -> anyhow::Result<Stored> {
    let Some(stored) = stored else {
        return fresh(names, now);
    };
    let old = &stored.serving;
    Ok(match renewal {
        Renewal::Keep => stored.clone(),
        Renewal::Fresh => fresh(names, now)?,
        Renewal::NewCa { leaf } => {
            let (ca_pem, ca_key_pem) = new_ca(now)?;
            let (cert_pem, key_pem) = if leaf {
                new_leaf(&ca_pem, &ca_key_pem, names, now)?
            } else {
                (old.cert_pem.clone(), old.key_pem.clone())
            };
            Stored {
                serving: ServingCert {
                    ca_pem: format!("{ca_pem}{}", unexpired(&old.ca_pem, now)),
                    cert_pem,
                    key_pem,
                },
                ca_key_pem: Some(ca_key_pem),
            }
        }
        Renewal::NewLeaf => {
            let ca_key_pem = stored.ca_key_pem.as_deref().context("no CA key to sign with")?;
            let (cert_pem, key_pem) = new_leaf(&old.ca_pem, ca_key_pem, names, now)?;
            Stored {
                serving: ServingCert {
                    ca_pem: old.ca_pem.clone(),
                    cert_pem,
                    key_pem,
                },
                ca_key_pem: stored.ca_key_pem.clone(),
            }
        }
        Renewal::Prune => Stored {
            serving: ServingCert {
                ca_pem: unexpired(&old.ca_pem, now),
                ..old.clone()
            },
            ca_key_pem: stored.ca_key_pem.clone(),
        },
    })
}

/// Where the serving certificate comes from.
#[derive(Clone, Debug)]
pub enum Source {
    Files {
        cert: PathBuf,
        key: PathBuf,
        ca: PathBuf,
    },
    Secret {
        namespace: String,
        name: String,
        names: Vec<String>,
        /// The MutatingWebhookConfiguration whose caBundle must trust a new CA before it signs
        /// what is served.
        configuration: String,
    },
}

/// The serving material now: read from the files, or from the shared Secret after renewing what
/// is due there. Called at start and periodically, so renewed files or Secrets are picked up.
pub async fn load(client: &Client, source: &Source) -> anyhow::Result<ServingCert> {
    match source {
        Source::Files { cert, key, ca } => {
            let read =
                |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
            Ok(ServingCert {
                ca_pem: read(ca)?,
                cert_pem: read(cert)?,
                key_pem: read(key)?,
            })
        }
        Source::Secret {
            namespace,
            name,
            names,
            configuration,
        } => shared(client, namespace, name, names, configuration).await,
    }
}

/// The replicas' one certificate, kept in the Secret `namespace/name`: read, renewed when due
/// (generated when it holds none). The Secret normally exists already, empty (the manifests ship
/// it, so no `create` on Secrets is needed); two replicas writing it at once both write with its
/// resourceVersion, and the loser reads the winner's.
async fn shared(
    client: &Client,
    namespace: &str,
    name: &str,
    names: &[String],
    configuration: &str,
) -> anyhow::Result<ServingCert> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let existing = api
        .get_opt(name)
        .await
        .context("reading the webhook certificate Secret")?;
    let stored = existing.as_ref().and_then(stored_in);
    let mut names = names.to_vec();
    names.sort();
    let now = now();
    let renewal = match &stored {
        None => Renewal::Fresh,
        Some(s) => {
            let mut facts = facts(s, now);
            // Only a certificate from another CA than the current one waits on the bundle.
            let switching = facts
                .ca
                .as_ref()
                .zip(facts.leaf.as_ref())
                .is_some_and(|(ca, leaf)| ca.subject != leaf.issuer);
            if switching {
                facts.ca_trusted = ca_trusted(client, configuration, &s.serving.ca_pem).await;
            }
            rotation::renewal(&facts, &names, now)
        }
    };
    if let (Renewal::Keep, Some(s)) = (renewal, &stored) {
        return Ok(s.serving.clone());
    }
    let next = renewed(renewal, stored.as_ref(), &names, now)?;
    let data: BTreeMap<String, ByteString> = [
        ("ca.crt", Some(&next.serving.ca_pem)),
        ("tls.crt", Some(&next.serving.cert_pem)),
        ("tls.key", Some(&next.serving.key_pem)),
        ("ca.key", next.ca_key_pem.as_ref()),
    ]
    .into_iter()
    .filter_map(|(k, v)| Some((k.to_owned(), ByteString(v?.as_bytes().to_vec()))))
    .collect();
    let written = match existing {
        Some(mut secret) => {
            // Keeps the Secret's resourceVersion: the write fails if another replica wrote it
            // since it was read.
            secret.data = Some(data);
            api.replace(name, &PostParams::default(), &secret).await
        }
        None => {
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    namespace: Some(namespace.to_owned()),
                    ..Default::default()
                },
                type_: Some("Opaque".into()),
                data: Some(data),
                ..Default::default()
            };
            api.create(&PostParams::default(), &secret).await
        }
    };
    match written {
        Ok(_) => {
            info!(secret = %format_args!("{namespace}/{name}"), ?renewal, "wrote the webhook certificates");
            Ok(next.serving)
        }
        // Another replica wrote first: use what it wrote.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let secret = api
                .get(name)
                .await
                .context("reading the webhook certificate Secret")?;
            stored_in(&secret)
                .map(|s| s.serving)
                .context("the webhook certificate Secret holds no certificate")
        }
        Err(kube::Error::Api(s)) if s.code == 403 => Err(anyhow::anyhow!(
            "the webhook certificate Secret {namespace}/{name} does not exist and this replica may not create it ({}); apply manifests/allocation/webhook-tls-secret.yaml",
            s.message
        )),
        Err(e) => Err(e).context("writing the webhook certificate Secret"),
    }
}

/// Whether the webhook configuration's every caBundle holds the current CA (the first of
/// `bundle`): replicas still running an older version, or a configuration re-applied without
/// the bundle, can keep an old one there longer than the settle time. A configuration that does
/// not exist (yet) calls nobody, so it trusts whatever comes.
async fn ca_trusted(client: &Client, configuration: &str, bundle: &str) -> bool {
    let Some(current) = pem_certs(bundle).into_iter().next() else {
        return false;
    };
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    match api.get_opt(configuration).await {
        Ok(Some(c)) => c.webhooks.iter().flatten().all(|w| {
            w.client_config
                .ca_bundle
                .as_ref()
                .and_then(|b| std::str::from_utf8(&b.0).ok())
                .is_some_and(|pem| pem_certs(pem).contains(&current))
        }),
        Ok(None) => true,
        // Unknown: wait, the certificate served now is still valid.
        Err(_) => false,
    }
}

/// What a Secret holds, if it holds a certificate (the shipped one is empty until a replica
/// fills it).
fn stored_in(secret: &Secret) -> Option<Stored> {
    let data = secret.data.as_ref()?;
    let field = |k: &str| {
        data.get(k)
            .filter(|v| !v.0.is_empty())
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
    };
    Some(Stored {
        serving: ServingCert {
            ca_pem: field("ca.crt")?,
            cert_pem: field("tls.crt")?,
            key_pem: field("tls.key")?,
        },
        ca_key_pem: field("ca.key"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;

    #[test]
    fn generated_certificate_is_signed_by_its_ca_for_every_name() {
        let c = generate(&["svcplane-webhook.kube-system.svc".into(), "127.0.0.1".into()]).unwrap();
        assert!(c.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(c.key_pem.contains("PRIVATE KEY"));
        // rustls accepts the pair and verifies it against the CA for both names.
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile_certs(&c.ca_pem) {
            roots.add(cert).unwrap();
        }
        let chain = rustls_pemfile_certs(&c.cert_pem);
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        for name in ["svcplane-webhook.kube-system.svc", "127.0.0.1"] {
            let server = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
            let now = rustls::pki_types::UnixTime::now();
            verifier
                .verify_server_cert(&chain[0], &[], &server, &[], now)
                .unwrap();
        }
        let other = rustls::pki_types::ServerName::try_from("elsewhere.example".to_owned()).unwrap();
        assert!(
            verifier
                .verify_server_cert(&chain[0], &[], &other, &[], rustls::pki_types::UnixTime::now())
                .is_err()
        );
    }

    #[test]
    fn an_empty_or_partial_secret_holds_no_certificate() {
        let secret = |keys: &[(&str, &str)]| Secret {
            data: (!keys.is_empty()).then(|| {
                keys.iter()
                    .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                    .collect()
            }),
            ..Default::default()
        };
        // As shipped.
        assert!(stored_in(&secret(&[])).is_none());
        assert!(stored_in(&secret(&[("ca.crt", "x"), ("tls.crt", "x")])).is_none());
        assert!(stored_in(&secret(&[("ca.crt", "x"), ("tls.crt", "x"), ("tls.key", "")])).is_none());
        // Written before renewal existed: no CA key.
        let legacy = stored_in(&secret(&[("ca.crt", "x"), ("tls.crt", "x"), ("tls.key", "x")])).unwrap();
        assert_eq!(legacy.ca_key_pem, None);
    }

    /// Whether `serving`'s certificate verifies against its bundle for `name` at `at`.
    fn verifies(serving: &ServingCert, name: &str, at: Secs) -> bool {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile_certs(&serving.ca_pem) {
            roots.add(cert).unwrap();
        }
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let chain = rustls_pemfile_certs(&serving.cert_pem);
        let server = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let at = rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            u64::try_from(at).unwrap(),
        ));
        verifier
            .verify_server_cert(&chain[0], &[], &server, &[], at)
            .is_ok()
    }

    fn step(stored: &Stored, names: &[String], now: Secs) -> (Renewal, Stored) {
        let r = rotation::renewal(&facts(stored, now), names, now);
        (r, renewed(r, Some(stored), names, now).unwrap())
    }

    #[test]
    fn renewal_keeps_what_is_served_trusted_at_every_step() {
        let names = vec!["svcplane-webhook.kube-system.svc".to_owned()];
        let t0: Secs = 1_800_000_000;
        let s0 = fresh(&names, t0).unwrap();
        assert_eq!(step(&s0, &names, t0).0, Renewal::Keep);
        assert!(verifies(&s0.serving, &names[0], t0 + 1));

        // The serving certificate is renewed before its end, by the same CA.
        let t1 = t0 + rotation::LEAF_LIFETIME - rotation::LEAF_RENEW_BEFORE + 1;
        let (r, s1) = step(&s0, &names, t1);
        assert_eq!(r, Renewal::NewLeaf);
        assert_eq!(s1.serving.ca_pem, s0.serving.ca_pem);
        assert_ne!(s1.serving.cert_pem, s0.serving.cert_pem);
        assert!(verifies(&s1.serving, &names[0], t1 + 1));

        // Near the CA's end a new one joins the bundle first; the old certificate is served
        // meanwhile and stays trusted.
        let t2 = t0 + rotation::CA_LIFETIME - rotation::CA_RENEW_BEFORE + 1;
        let (_, s2) = step(&s1, &names, t2 - rotation::LEAF_LIFETIME / 2);
        let (r, s2) = step(&s2, &names, t2);
        assert_eq!(r, Renewal::NewCa { leaf: false });
        assert_eq!(rustls_pemfile_certs(&s2.serving.ca_pem).len(), 2);
        assert!(verifies(&s2.serving, &names[0], t2 + 1));
        assert_eq!(step(&s2, &names, t2 + 60).0, Renewal::Keep);
        // Once settled, the new CA signs the served certificate.
        let t3 = t2 + rotation::BUNDLE_SETTLE;
        let (r, s3) = step(&s2, &names, t3);
        assert_eq!(r, Renewal::NewLeaf);
        let only_new = ServingCert {
            ca_pem: to_pem(&pem_certs(&s3.serving.ca_pem)[0]),
            ..s3.serving.clone()
        };
        assert!(verifies(&only_new, &names[0], t3 + 1));
        // When the old CA expires it leaves the bundle (after the served certificate, due by
        // then too, is renewed).
        let t4 = t0 + rotation::CA_LIFETIME;
        let (r, s4) = step(&s3, &names, t4);
        assert_eq!(r, Renewal::NewLeaf);
        let (r, s4) = step(&s4, &names, t4);
        assert_eq!(r, Renewal::Prune);
        assert_eq!(step(&s4, &names, t4).0, Renewal::Keep);
        assert_eq!(rustls_pemfile_certs(&s4.serving.ca_pem).len(), 1);
        assert!(verifies(&s4.serving, &names[0], t4 + 1));
    }

    #[test]
    fn a_secret_from_before_renewal_gets_a_ca_it_can_sign_with() {
        let names = vec!["127.0.0.1".to_owned()];
        let t0: Secs = 1_800_000_000;
        let legacy = Stored {
            ca_key_pem: None,
            ..fresh(&names, t0).unwrap()
        };
        let (r, s1) = step(&legacy, &names, t0 + 10);
        assert_eq!(r, Renewal::NewCa { leaf: false });
        assert_eq!(s1.serving.cert_pem, legacy.serving.cert_pem);
        assert!(s1.ca_key_pem.is_some());
        assert!(verifies(&s1.serving, "127.0.0.1", t0 + 20));
        let (r, s2) = step(&s1, &names, t0 + 10 + rotation::BUNDLE_SETTLE);
        assert_eq!(r, Renewal::NewLeaf);
        assert!(verifies(
            &s2.serving,
            "127.0.0.1",
            t0 + 20 + rotation::BUNDLE_SETTLE
        ));
        // New names: a certificate for them.
        let other = vec!["svcplane-webhook.kube-system.svc".to_owned()];
        let t3 = t0 + 20 + rotation::BUNDLE_SETTLE;
        let (r, s3) = step(&s2, &other, t3);
        assert_eq!(r, Renewal::NewLeaf);
        assert!(verifies(&s3.serving, &other[0], t3 + 1));
        assert!(!verifies(&s3.serving, "127.0.0.1", t3 + 1));
    }

    fn rustls_pemfile_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
            .map(Result::unwrap)
            .collect()
    }
}
