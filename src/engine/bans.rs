//! Containment that does not depend on the compromised side: an operator's
//! bans at this verifier, by certificate serial, by instance, by kid or by
//! SPIFFE ID. A `BanList` is an immutable snapshot (one writer publishes it
//! through a `watch`, as the trust set is); `KeyOrigins` remembers which
//! certificate (serial) and which instance delivered each peer key, so a
//! ban of a certificate also reaches the keys it published before. An
//! instance is what the key set names itself: a signed document's
//! `instance` id (and the peer API address its document advertises), or,
//! for a plain key set from a release without documents, the peer address
//! (`host:port`) it was fetched from. A verification that rests on banned
//! material is refused as `revoked_key`. Pure: no tasks, no I/O.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::verify::KeyUse;
use crate::reason::{Reason, Refusal};
use crate::time::UnixTime;

/// What a ban matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BanKind {
    /// A peer certificate, by serial number (hex).
    Serial,
    /// One instance of a service: its document's instance id or
    /// advertised peer address (`host:port`), or the peer address a plain
    /// key set came from.
    Instance,
    /// One key, by kid, whoever publishes it.
    Kid,
    /// A whole service, by SPIFFE ID.
    SpiffeId,
}

impl BanKind {
    /// The name on the wire and in the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            BanKind::Serial => "serial",
            BanKind::Instance => "instance",
            BanKind::Kid => "kid",
            BanKind::SpiffeId => "spiffe_id",
        }
    }

    /// Parses `serial`, `instance`, `kid` or `spiffe_id` (`spiffe-id` too).
    pub fn parse(text: &str) -> Option<BanKind> {
        Some(match text {
            "serial" => BanKind::Serial,
            "instance" => BanKind::Instance,
            "kid" => BanKind::Kid,
            "spiffe_id" | "spiffe-id" => BanKind::SpiffeId,
            _ => return None,
        })
    }
}

/// A certificate serial as tokend prints it: lowercase hex, no separators,
/// no leading zero bytes. Accepts `0x`, colons and upper case (openssl's
/// and browsers' forms); `None` if it is not hex.
pub(crate) fn normalize_serial(text: &str) -> Option<String> {
    let t = text.trim();
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    let mut hex: String = t
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    if hex.len() % 2 == 1 {
        hex.insert(0, '0');
    }
    while hex.len() > 2 && hex.starts_with("00") {
        hex.drain(..2);
    }
    Some(hex)
}

/// One ban.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ban {
    /// What it matches.
    pub kind: BanKind,
    /// The serial, instance, kid or SPIFFE ID.
    pub value: String,
    /// Why, as the operator wrote it.
    #[serde(default)]
    pub reason: String,
    /// When it was set.
    pub at: UnixTime,
}

/// Where a peer key came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyOrigin {
    /// The serial of the certificate that vouched for it: the signing
    /// (x5c leaf) certificate of a document, or the certificate the
    /// publishing connection presented for a plain key set.
    pub serial: String,
    /// The instance that published it: a document's instance id, or the
    /// peer address (`host:port`) a plain key set was fetched from.
    pub instance: String,
    /// The peer API address (`host:port`) a document advertises for its
    /// instance, when it names one: a ban by instance matches it too.
    pub address: Option<String>,
}

/// An immutable snapshot of the bans in force.
#[derive(Clone, Debug, Default)]
pub struct BanList {
    bans: Vec<Ban>,
    index: HashSet<(BanKind, String)>,
}

// === impl BanList ===

impl BanList {
    /// A list of `bans` (duplicates kept once).
    pub fn new(bans: Vec<Ban>) -> Self {
        let mut list = BanList::default();
        for b in bans {
            if list.index.insert((b.kind, b.value.clone())) {
                list.bans.push(b);
            }
        }
        list
    }

    /// Every ban, in the order they were set.
    pub fn bans(&self) -> &[Ban] {
        &self.bans
    }

    /// Whether no ban is in force (the verify fast path).
    pub fn is_empty(&self) -> bool {
        self.bans.is_empty()
    }

    fn find(&self, kind: BanKind, value: &str) -> Option<&Ban> {
        if !self.index.contains(&(kind, value.to_owned())) {
            return None;
        }
        self.bans
            .iter()
            .find(|b| b.kind == kind && b.value == value)
    }

    /// The ban a peer certificate (its identity and serial) falls under.
    pub fn of_certificate(&self, identity: &str, serial: &str) -> Option<&Ban> {
        self.find(BanKind::SpiffeId, identity)
            .or_else(|| self.find(BanKind::Serial, serial))
    }

    /// The ban an instance falls under.
    pub fn of_instance(&self, instance: &str) -> Option<&Ban> {
        self.find(BanKind::Instance, instance)
    }

    /// The ban a delivery from `origin` for `identity` falls under: its
    /// identity, its certificate's serial, its instance or the address its
    /// instance advertises. Nothing from it may be installed.
    pub fn of_origin(&self, identity: &str, origin: &KeyOrigin) -> Option<&Ban> {
        self.of_certificate(identity, &origin.serial)
            .or_else(|| self.of_instance(&origin.instance))
            .or_else(|| origin.address.as_deref().and_then(|a| self.of_instance(a)))
    }

    /// The ban one key of `issuer` falls under, given every instance that
    /// delivered it (one banned origin is enough).
    pub fn of_key(&self, issuer: &str, kid: &str, origins: &[KeyOrigin]) -> Option<&Ban> {
        self.find(BanKind::Kid, kid)
            .or_else(|| self.find(BanKind::SpiffeId, issuer))
            .or_else(|| origins.iter().find_map(|o| self.of_origin(issuer, o)))
    }

    /// The refusal a verification that rested on `keys` earns, if any.
    pub fn refusal(&self, keys: &[KeyUse], origins: &KeyOrigins) -> Option<Refusal> {
        if self.is_empty() {
            return None;
        }
        keys.iter().find_map(|k| {
            let origin = origins.get(&k.issuer, &k.kid);
            self.of_key(&k.issuer, &k.kid, &origin).map(|b| {
                Refusal::new(
                    Reason::RevokedKey,
                    format!(
                        "key {} of {} is banned at this verifier ({} {}{})",
                        k.kid,
                        k.issuer,
                        b.kind.as_str(),
                        b.value,
                        if b.reason.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", b.reason)
                        }
                    ),
                )
            })
        })
    }
}

/// A reader of the published ban snapshots. Cheap to clone.
#[derive(Clone, Debug)]
pub struct BanView(watch::Receiver<Arc<BanList>>);

impl BanView {
    /// Wraps the receiving end of the writer's channel.
    pub fn new(rx: watch::Receiver<Arc<BanList>>) -> Self {
        Self(rx)
    }

    /// A view of no bans, ever (tests, benches, offline tools).
    pub fn none() -> Self {
        Self(watch::channel(Arc::new(BanList::default())).1)
    }

    /// The current snapshot.
    pub fn current(&self) -> Arc<BanList> {
        self.0.borrow().clone()
    }
}

/// Which certificate and instance delivered each peer key, per issuer:
/// kid → one origin per instance that publishes it (replicas sharing a key
/// each vouch for it). Written by the peer clients and the document sink
/// as sets arrive; read by verifications.
#[derive(Clone, Debug, Default)]
pub struct KeyOrigins(Arc<RwLock<HashMap<String, OriginsOfIssuer>>>);

/// One issuer's kids → the origins (one per instance) of each.
type OriginsOfIssuer = HashMap<String, Vec<KeyOrigin>>;

impl KeyOrigins {
    /// Records that `origin` now publishes `kids` for `issuer`; what the
    /// same instance published before is forgotten. Called once the set is
    /// installed: a refused delivery (a replayed older document signed by
    /// another certificate) must not rewrite where installed keys came from.
    pub fn record(&self, issuer: &str, origin: &KeyOrigin, kids: impl IntoIterator<Item = String>) {
        let mut all = self.0.write().unwrap_or_else(|p| p.into_inner());
        let of_issuer = all.entry(issuer.to_owned()).or_default();
        of_issuer.retain(|_, os| {
            os.retain(|o| o.instance != origin.instance);
            !os.is_empty()
        });
        for kid in kids {
            of_issuer.entry(kid).or_default().push(origin.clone());
        }
    }

    /// Records `origin` for those of `kids` this instance has no origin
    /// for yet, BEFORE the set is installed: a verification never finds a
    /// key installed with no origin to check bans against, and an origin
    /// already known is not touched until `record` confirms the delivery.
    /// (An entry left by a delivery that is then refused only makes bans
    /// reach further, until the instance's next `record`.)
    pub fn record_new(
        &self,
        issuer: &str,
        origin: &KeyOrigin,
        kids: impl IntoIterator<Item = String>,
    ) {
        let mut all = self.0.write().unwrap_or_else(|p| p.into_inner());
        let of_issuer = all.entry(issuer.to_owned()).or_default();
        for kid in kids {
            let os = of_issuer.entry(kid).or_default();
            if !os.iter().any(|o| o.instance == origin.instance) {
                os.push(origin.clone());
            }
        }
    }

    /// Where `issuer`'s key `kid` came from: every instance that delivered
    /// it (none for the own keys and JWKS files).
    pub fn get(&self, issuer: &str, kid: &str) -> Vec<KeyOrigin> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(issuer)
            .and_then(|m| m.get(kid))
            .cloned()
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ban(kind: BanKind, value: &str) -> Ban {
        Ban {
            kind,
            value: value.into(),
            reason: "test".into(),
            at: UnixTime::from_secs(1),
        }
    }

    fn key(issuer: &str, kid: &str) -> KeyUse {
        KeyUse {
            issuer: issuer.into(),
            kid: kid.into(),
            fingerprint: [0; 32],
            class: crate::keys::KeyClass::Signing,
        }
    }

    /// Each kind of ban reaches exactly the keys it names: a serial or an
    /// instance through the key's origin, a kid anywhere, an identity for
    /// all its keys; the refusal is `revoked_key` and names the ban.
    #[test]
    fn bans_match_what_they_name() {
        let origins = KeyOrigins::default();
        let o1 = KeyOrigin {
            serial: "0a".into(),
            instance: "10.0.0.1:7443".into(),
            address: None,
        };
        origins.record("spiffe://td/a", &o1, ["k1".to_owned()]);
        let k1 = [key("spiffe://td/a", "k1")];
        let k2 = [key("spiffe://td/b", "k2")];
        for b in [
            ban(BanKind::Serial, "0a"),
            ban(BanKind::Instance, "10.0.0.1:7443"),
            ban(BanKind::Kid, "k1"),
            ban(BanKind::SpiffeId, "spiffe://td/a"),
        ] {
            let list = BanList::new(vec![b.clone()]);
            let r = list.refusal(&k1, &origins).expect("refused");
            assert_eq!(r.reason, Reason::RevokedKey);
            assert!(r.detail.contains(&b.value), "{}", r.detail);
            assert!(list.refusal(&k2, &origins).is_none(), "{b:?}");
        }
        assert!(BanList::default().refusal(&k1, &origins).is_none());
        // A new certificate at the same instance takes over its keys.
        let o2 = KeyOrigin {
            serial: "0b".into(),
            ..o1.clone()
        };
        origins.record("spiffe://td/a", &o2, ["k1".to_owned()]);
        let list = BanList::new(vec![ban(BanKind::Serial, "0a")]);
        assert!(list.refusal(&k1, &origins).is_none());
    }

    /// A document's origin (instance id and advertised address): a ban by
    /// instance matches either; a ban of one replica's certificate reaches
    /// only the keys that replica vouches for, but a key two replicas both
    /// deliver is refused once either is banned; a refused delivery
    /// (`record_new` without `record`) does not rewrite a known origin.
    #[test]
    fn document_origins_and_replicas() {
        let origins = KeyOrigins::default();
        let id = "spiffe://td/a";
        let r1 = KeyOrigin {
            serial: "01".into(),
            instance: "i-1".into(),
            address: Some("10.0.0.1:7443".into()),
        };
        let r2 = KeyOrigin {
            serial: "02".into(),
            instance: "i-2".into(),
            address: Some("10.0.0.2:7443".into()),
        };
        origins.record(id, &r1, ["k1".to_owned(), "shared".to_owned()]);
        origins.record(id, &r2, ["k2".to_owned(), "shared".to_owned()]);
        let k = |kid: &str| [key(id, kid)];
        for value in ["i-1", "10.0.0.1:7443"] {
            let list = BanList::new(vec![ban(BanKind::Instance, value)]);
            assert!(list.refusal(&k("k1"), &origins).is_some(), "{value}");
            assert!(list.refusal(&k("k2"), &origins).is_none(), "{value}");
        }
        let list = BanList::new(vec![ban(BanKind::Serial, "02")]);
        assert!(list.refusal(&k("k1"), &origins).is_none());
        assert!(list.refusal(&k("k2"), &origins).is_some());
        assert!(list.refusal(&k("shared"), &origins).is_some());
        // A replayed older document of i-2 signed by certificate 03 is
        // refused by the writer: its known kids keep serial 02.
        let old = KeyOrigin {
            serial: "03".into(),
            ..r2.clone()
        };
        origins.record_new(id, &old, ["k2".to_owned()]);
        assert!(list.refusal(&k("k2"), &origins).is_some());
        assert_eq!(origins.get(id, "k2"), vec![r2]);
    }

    /// Serials are accepted in openssl's, browsers' and tokend's forms.
    #[test]
    fn serial_forms() {
        assert_eq!(normalize_serial("0x0A:1b").as_deref(), Some("0a1b"));
        assert_eq!(normalize_serial("00:ff").as_deref(), Some("ff"));
        assert_eq!(normalize_serial("abc").as_deref(), Some("0abc"));
        assert_eq!(normalize_serial("xyz"), None);
        assert_eq!(normalize_serial(""), None);
    }
}
