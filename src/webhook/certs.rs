//! The webhook's serving certificate: from files given by flag, or generated once per cluster and
//! shared by every replica through a Secret (the first replica to start creates it; the others,
//! losing the create race, read it), so that one `caBundle` trusts them all.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use anyhow::Context;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use tracing::info;

/// PEM-encoded serving material and the CA that signs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServingCert {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Generates a CA and a serving certificate for `names` (DNS names or IP addresses).
pub fn generate(names: &[String]) -> anyhow::Result<ServingCert> {
    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name
        .push(DnType::CommonName, "svcplane-webhook-ca");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let ca_cert = ca.self_signed(&ca_key).context("signing the CA")?;
    let issuer = Issuer::new(ca, &ca_key);

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
    leaf.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let cert = leaf
        .signed_by(&key, &issuer)
        .context("signing the serving certificate")?;
    Ok(ServingCert {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
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
    },
}

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
        } => shared(client, namespace, name, names).await,
    }
}

/// The replicas' one certificate, kept in the Secret `namespace/name`: read when it holds one;
/// generated and written otherwise. The Secret normally exists already, empty (the manifests
/// ship it, so no `create` on Secrets is needed); two replicas filling it at once both write
/// with its resourceVersion, and the loser reads the winner's.
async fn shared(
    client: &Client,
    namespace: &str,
    name: &str,
    names: &[String],
) -> anyhow::Result<ServingCert> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let existing = api
        .get_opt(name)
        .await
        .context("reading the webhook certificate Secret")?;
    if let Some(secret) = &existing
        && holds_certificate(secret)
    {
        return from_secret(secret);
    }
    let fresh = generate(names)?;
    let data: BTreeMap<String, ByteString> = [
        ("ca.crt", &fresh.ca_pem),
        ("tls.crt", &fresh.cert_pem),
        ("tls.key", &fresh.key_pem),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
    .collect();
    let written = match existing {
        Some(mut secret) => {
            // Keeps the Secret's resourceVersion: the write fails if another replica filled it
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
            info!(secret = %format_args!("{namespace}/{name}"), "generated the webhook serving certificate");
            Ok(fresh)
        }
        // Another replica won the race: use its certificate.
        Err(kube::Error::Api(s)) if s.code == 409 => from_secret(
            &api.get(name)
                .await
                .context("reading the webhook certificate Secret")?,
        ),
        Err(kube::Error::Api(s)) if s.code == 403 => Err(anyhow::anyhow!(
            "the webhook certificate Secret {namespace}/{name} does not exist and this replica may not create it ({}); apply manifests/allocation/webhook-tls-secret.yaml",
            s.message
        )),
        Err(e) => Err(e).context("writing the webhook certificate Secret"),
    }
}

/// Whether a Secret holds a certificate (the shipped one is empty until a replica fills it).
fn holds_certificate(secret: &Secret) -> bool {
    secret.data.as_ref().is_some_and(|d| {
        ["ca.crt", "tls.crt", "tls.key"]
            .iter()
            .all(|k| d.get(*k).is_some_and(|v| !v.0.is_empty()))
    })
}

fn from_secret(secret: &Secret) -> anyhow::Result<ServingCert> {
    let data = secret
        .data
        .as_ref()
        .context("webhook certificate Secret has no data")?;
    let field = |k: &str| -> anyhow::Result<String> {
        let bytes = data
            .get(k)
            .with_context(|| format!("webhook certificate Secret lacks {k}"))?;
        String::from_utf8(bytes.0.clone()).with_context(|| format!("{k} is not PEM text"))
    };
    Ok(ServingCert {
        ca_pem: field("ca.crt")?,
        cert_pem: field("tls.crt")?,
        key_pem: field("tls.key")?,
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
        assert!(!holds_certificate(&secret(&[])));
        assert!(!holds_certificate(&secret(&[("ca.crt", "x"), ("tls.crt", "x")])));
        assert!(!holds_certificate(&secret(&[
            ("ca.crt", "x"),
            ("tls.crt", "x"),
            ("tls.key", "")
        ])));
        assert!(holds_certificate(&secret(&[
            ("ca.crt", "x"),
            ("tls.crt", "x"),
            ("tls.key", "x")
        ])));
    }

    fn rustls_pemfile_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
            .map(Result::unwrap)
            .collect()
    }
}
