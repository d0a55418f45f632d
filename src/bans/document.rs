//! The fleet-wide ban document: one list of bans for a whole trust domain,
//! signed (compact JWS, ES256) by the key the trust domain designates for
//! it (`[bans] signer`, a certificate file), so it can travel over any
//! channel that can delay or withhold it but not forge or alter it. A
//! sequence number that only grows stops a replay of an older document.
//! Pure: text in, a checked document or the reason out; `sign` is the
//! operator's side (`tokend ban sign`).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::{Deserialize, Serialize};

use crate::engine::{Ban, BanKind};
use crate::time::UnixTime;

/// The `typ` of a ban document's header.
pub(crate) const DOCUMENT_TYP: &str = "tokend-bans+jwt";
/// The largest document accepted.
pub(crate) const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    alg: String,
    typ: String,
}

/// One entry of a document, as the signer writes it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Entry {
    /// serial | instance | kid | spiffe_id
    pub(crate) kind: BanKind,
    /// What it names.
    pub(crate) value: String,
    /// Why.
    #[serde(default)]
    pub(crate) reason: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    trust_domain: String,
    seq: u64,
    iat: i64,
    bans: Vec<Entry>,
}

/// A checked ban document.
#[derive(Clone, Debug)]
pub(crate) struct Document {
    /// Its sequence number.
    pub(crate) seq: u64,
    /// Its bans, dated when it was signed.
    pub(crate) bans: Vec<Ban>,
}

/// The P-256 public key (uncompressed point) of a PEM certificate.
pub(crate) fn signer_key(cert_pem: &[u8]) -> Result<Vec<u8>, String> {
    let block = pem::parse(cert_pem).map_err(|e| format!("not a PEM certificate: {e}"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(block.contents())
        .map_err(|e| format!("certificate does not parse: {e}"))?;
    let spki = cert.public_key();
    let p256 = x509_parser::oid_registry::OID_EC_P256;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if curve.as_ref() != Some(&p256) {
        return Err("the signer's key must be ECDSA P-256 (as `tokend ca issue` makes)".into());
    }
    Ok(spki.subject_public_key.data.to_vec())
}

/// Checks `text` against the designated signer's key for trust domain `td`.
pub(crate) fn verify(text: &str, signer: &[u8], td: &str) -> Result<Document, String> {
    if text.len() > MAX_DOCUMENT_BYTES {
        return Err(format!("larger than {MAX_DOCUMENT_BYTES} bytes"));
    }
    let mut parts = text.trim_end_matches('\n').split('.');
    let (Some(h), Some(p), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not a compact JWS (three dot-separated parts)".into());
    };
    let header: Header = B64
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or("header is not base64url JSON of alg and typ")?;
    if header.alg != "ES256" || header.typ != DOCUMENT_TYP {
        return Err(format!(
            "header must be alg ES256, typ {DOCUMENT_TYP}; got {:?}, {:?}",
            header.alg, header.typ
        ));
    }
    let signature = B64.decode(sig).map_err(|_| "signature is not base64url")?;
    let key =
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, signer);
    key.verify(format!("{h}.{p}").as_bytes(), &signature)
        .map_err(|_| "signature does not verify with the designated signer's key".to_owned())?;
    let payload: Payload = B64
        .decode(p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or("payload is not base64url JSON of trust_domain, seq, iat, bans")?;
    if payload.trust_domain != td {
        return Err(format!(
            "made for trust domain {:?}, this is {td:?}",
            payload.trust_domain
        ));
    }
    let at = UnixTime::from_secs(payload.iat);
    let bans = payload
        .bans
        .into_iter()
        .map(|e| {
            Ok(Ban {
                value: normalize(e.kind, &e.value, td)?,
                kind: e.kind,
                reason: e.reason,
                at,
            })
        })
        .collect::<Result<_, String>>()?;
    Ok(Document {
        seq: payload.seq,
        bans,
    })
}

/// A ban value in the form the verifier matches: a serial as lowercase hex
/// without leading zero bytes, a SPIFFE ID in full (a bare service name
/// means one of `td`).
pub(crate) fn normalize(kind: BanKind, value: &str, td: &str) -> Result<String, String> {
    let value = value.trim();
    if value.is_empty() {
        return Err(format!("a {} ban with an empty value", kind.as_str()));
    }
    match kind {
        BanKind::Serial => crate::engine::normalize_serial(value)
            .ok_or_else(|| format!("serial {value:?} is not hexadecimal")),
        BanKind::SpiffeId => crate::identity::TrustDomain::new(td)
            .and_then(|t| t.audience(value))
            .map(|id| id.to_string())
            .map_err(|e| e.to_string()),
        BanKind::Instance | BanKind::Kid => Ok(value.to_owned()),
    }
}

/// Signs a document of `bans` for `td` at `seq` with a PKCS#8 P-256 key.
pub(crate) fn sign(
    key_pkcs8: &[u8],
    td: &str,
    seq: u64,
    iat: UnixTime,
    bans: Vec<Entry>,
) -> Result<String, String> {
    let bans = bans
        .into_iter()
        .map(|e| {
            Ok(Entry {
                value: normalize(e.kind, &e.value, td)?,
                ..e
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let rng = ring::rand::SystemRandom::new();
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        key_pkcs8,
        &rng,
    )
    .map_err(|e| format!("the signing key is not a PKCS#8 P-256 key: {e}"))?;
    let header = serde_json::to_vec(&Header {
        alg: "ES256".into(),
        typ: DOCUMENT_TYP.into(),
    })
    .map_err(|e| e.to_string())?;
    let payload = serde_json::to_vec(&Payload {
        trust_domain: td.to_owned(),
        seq,
        iat: iat.as_secs(),
        bans,
    })
    .map_err(|e| e.to_string())?;
    let input = format!("{}.{}", B64.encode(header), B64.encode(payload));
    let sig = pair
        .sign(&rng, input.as_bytes())
        .map_err(|_| "signing failed".to_owned())?;
    Ok(format!("{input}.{}", B64.encode(sig.as_ref())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> (Vec<u8>, Vec<u8>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        let cert = params.self_signed(&key).expect("cert");
        (
            key.serialize_der(),
            signer_key(cert.pem().as_bytes()).expect("spki"),
        )
    }

    /// A document signed by the designated key verifies; one signed by
    /// another key, altered, or made for another trust domain does not.
    #[test]
    fn only_the_designated_signer_counts() {
        let (key, public) = signer();
        let (other, _) = signer();
        let entry = Entry {
            kind: BanKind::Serial,
            value: "0a".into(),
            reason: "r".into(),
        };
        let doc = sign(&key, "td", 3, UnixTime::from_secs(9), vec![entry.clone()]).expect("sign");
        let ok = verify(&doc, &public, "td").expect("verifies");
        assert_eq!(ok.seq, 3);
        assert_eq!(ok.bans[0].value, "0a");
        assert!(verify(&doc, &public, "other").is_err());
        let forged = sign(&other, "td", 4, UnixTime::from_secs(9), vec![entry]).expect("sign");
        assert!(
            verify(&forged, &public, "td")
                .expect_err("forged")
                .contains("signer")
        );
        let (h, rest) = doc.split_once('.').expect("parts");
        let (_, s) = rest.split_once('.').expect("parts");
        let altered = format!(
            "{h}.{}.{s}",
            B64.encode(b"{\"trust_domain\":\"td\",\"seq\":9,\"iat\":0,\"bans\":[]}")
        );
        assert!(verify(&altered, &public, "td").is_err());
        assert!(verify("a.b", &public, "td").is_err());
    }
}
