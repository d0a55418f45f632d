//! Structure-aware: the input describes a token (header and claims, each
//! member defaulting to what a valid token from `PEER` to `OWN` at `NOW`
//! has, so the empty input is a valid token), optionally a delegation chain
//! of such tokens, and byte edits. The harness signs each token with the
//! trusted key (raw text, so duplicate members and odd JSON are signed too),
//! applies the edits to the outermost token, and verifies it at `NOW`.
//!
//! Invariants: those of `check_outcome` (no panic, reasons from
//! `Reason::ALL`, nothing accepted unless the trusted key signed it, the
//! accepted claims pass the documented checks), and: a token whose bytes
//! the edits changed is never accepted. tokend decodes base64url strictly
//! (no padding, no non-zero unused trailing bits), so every signed byte
//! string has exactly one accepted text and any edit must be refused.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tokend_fuzz::{NOW, NOW_SECS, OWN, PEER, REVOKED_KID, check_outcome, fixture};

/// A JSON value of bounded depth.
#[derive(Arbitrary, Debug)]
enum J {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl J {
    fn value(&self, depth: usize) -> Value {
        if depth > 40 {
            return Value::Null;
        }
        match self {
            J::Null => Value::Null,
            J::Bool(b) => (*b).into(),
            J::Int(i) => (*i).into(),
            J::Float(f) => Value::from(*f),
            J::Str(s) => s.as_str().into(),
            J::Arr(a) => a.iter().map(|j| j.value(depth + 1)).collect(),
            J::Obj(m) => Value::Object(
                m.iter()
                    .map(|(k, j)| (k.clone(), j.value(depth + 1)))
                    .collect(),
            ),
        }
    }
}

/// One member: its default (valid) value, absent, a choice, or any JSON.
#[derive(Arbitrary, Debug)]
enum F<T> {
    Default,
    Absent,
    Set(T),
    Json(J),
}

#[derive(Arbitrary, Debug)]
enum Who {
    Peer,
    Own,
    Other(String),
}

impl Who {
    fn s(&self) -> String {
        match self {
            Who::Peer => PEER.into(),
            Who::Own => OWN.into(),
            Who::Other(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Aud {
    One(Who),
    List(Vec<Who>),
}

#[derive(Arbitrary, Debug)]
enum Time {
    /// Seconds from the default.
    Shift(i16),
    /// Seconds from NOW.
    FromNow(i32),
    Abs(i64),
    Float(f64),
    Huge(u64),
}

#[derive(Arbitrary, Debug)]
enum Alg {
    Rs256,
    Hs256,
    None,
    Ps256,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Kid {
    Trusted,
    Revoked,
    Other(String),
}

#[derive(Arbitrary, Debug)]
enum Typ {
    Jwt,
    Lower,
    Jose,
    Other(String),
}

#[derive(Arbitrary, Debug)]
struct Header {
    alg: F<Alg>,
    kid: F<Kid>,
    typ: Option<Typ>,
    extra: Vec<(String, J)>,
}

#[derive(Arbitrary, Debug)]
struct Claims {
    iss: F<Who>,
    sub: F<Who>,
    aud: F<Aud>,
    iat: F<Time>,
    nbf: F<Time>,
    exp: F<Time>,
    jti: F<String>,
    one_time: Option<bool>,
    /// `act.sub` of the link below, if there is one.
    act_sub: F<Who>,
    /// Caller claims (and duplicates of registered ones).
    extra: Vec<(String, J)>,
}

#[derive(Arbitrary, Debug)]
struct Token {
    header: Header,
    claims: Claims,
    /// Sign this text as the header instead.
    raw_header: Option<String>,
    /// Sign this text as the payload instead.
    raw_payload: Option<String>,
}

#[derive(Arbitrary, Debug)]
enum Edit {
    Flip {
        at: u16,
        bit: u8,
    },
    Set {
        at: u16,
        byte: u8,
    },
    Insert {
        at: u16,
        byte: u8,
    },
    Delete {
        at: u16,
    },
    Truncate {
        len: u16,
    },
    Duplicate {
        at: u16,
        len: u8,
    },
    /// Set the unused low bits of part `part`'s last character (a
    /// non-canonical encoding of the same bytes, where there are any).
    Tail {
        part: u8,
        bits: u8,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// The token presented, then the links it was exchanged from, in order.
    tokens: Vec<Token>,
    audience: Option<Who>,
    edits: Vec<Edit>,
}

/// JSON object text from members in order (duplicates allowed).
fn object(members: &[(String, Value)]) -> String {
    let body: Vec<String> = members
        .iter()
        .map(|(k, v)| format!("{}:{v}", Value::String(k.clone())))
        .collect();
    format!("{{{}}}", body.join(","))
}

fn push<T>(
    m: &mut Vec<(String, Value)>,
    name: &str,
    f: &F<T>,
    default: Value,
    set: impl Fn(&T) -> Value,
) {
    match f {
        F::Default => m.push((name.into(), default)),
        F::Absent => {}
        F::Set(t) => m.push((name.into(), set(t))),
        F::Json(j) => m.push((name.into(), j.value(0))),
    }
}

fn time(t: &Time, default: i64) -> Value {
    match t {
        Time::Shift(s) => (default + i64::from(*s)).into(),
        Time::FromNow(s) => (NOW_SECS + i64::from(*s)).into(),
        Time::Abs(a) => (*a).into(),
        Time::Float(f) => Value::from(*f),
        Time::Huge(u) => (*u).into(),
    }
}

/// Signs token `depth` (0 = presented) of the chain, `link` being the
/// signed token it was exchanged from, if any.
fn sign(t: &Token, depth: usize, link: Option<&str>) -> String {
    let f = fixture();
    let h = &t.header;
    let mut hm = Vec::new();
    push(&mut hm, "alg", &h.alg, "RS256".into(), |a| match a {
        Alg::Rs256 => "RS256".into(),
        Alg::Hs256 => "HS256".into(),
        Alg::None => "none".into(),
        Alg::Ps256 => "PS256".into(),
        Alg::Other(s) => s.as_str().into(),
    });
    push(&mut hm, "kid", &h.kid, f.kid.as_str().into(), |k| match k {
        Kid::Trusted => f.kid.as_str().into(),
        Kid::Revoked => REVOKED_KID.into(),
        Kid::Other(s) => s.as_str().into(),
    });
    if let Some(typ) = &h.typ {
        let v = match typ {
            Typ::Jwt => "JWT",
            Typ::Lower => "jwt",
            Typ::Jose => "JOSE",
            Typ::Other(s) => s,
        };
        hm.push(("typ".into(), v.into()));
    }
    hm.extend(h.extra.iter().map(|(k, j)| (k.clone(), j.value(0))));

    // Defaults: a chain where every link is PEER's own token to PEER, each
    // older and outliving the one exchanged from it (d = depth).
    let d = depth as i64;
    let iat = NOW_SECS - 10 - 10 * d;
    let exp = NOW_SECS + 290 + 10 * d;
    let c = &t.claims;
    let mut cm = Vec::new();
    let iss = match &c.iss {
        F::Set(w) => w.s(),
        _ => PEER.into(),
    };
    push(&mut cm, "iss", &c.iss, PEER.into(), |w| w.s().into());
    push(&mut cm, "sub", &c.sub, PEER.into(), |w| w.s().into());
    let default_aud = if depth == 0 { OWN } else { PEER };
    push(&mut cm, "aud", &c.aud, default_aud.into(), |a| match a {
        Aud::One(w) => w.s().into(),
        Aud::List(l) => l.iter().map(|w| Value::from(w.s())).collect(),
    });
    push(&mut cm, "iat", &c.iat, iat.into(), |t| time(t, iat));
    push(&mut cm, "nbf", &c.nbf, iat.into(), |t| time(t, iat));
    push(&mut cm, "exp", &c.exp, exp.into(), |t| time(t, exp));
    push(&mut cm, "jti", &c.jti, format!("jti-{depth}").into(), |s| {
        s.as_str().into()
    });
    if let Some(o) = c.one_time {
        cm.push(("one_time".into(), o.into()));
    }
    if let Some(link) = link {
        let mut act = Vec::new();
        push(&mut act, "sub", &c.act_sub, iss.into(), |w| w.s().into());
        act.push(("prev_token".into(), link.into()));
        let act: serde_json::Map<String, Value> = act.into_iter().collect();
        cm.push(("act".into(), Value::Object(act)));
    }
    cm.extend(c.extra.iter().map(|(k, j)| (k.clone(), j.value(0))));

    let header = t.raw_header.clone().unwrap_or_else(|| object(&hm));
    let payload = t.raw_payload.clone().unwrap_or_else(|| object(&cm));
    f.sign_raw(&header, &payload)
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn apply(token: &mut Vec<u8>, e: &Edit) {
    let at = |i: u16, n: usize| usize::from(i) % (n + 1);
    match *e {
        Edit::Flip { at: i, bit } => {
            if !token.is_empty() {
                let i = usize::from(i) % token.len();
                token[i] ^= 1 << (bit % 8);
            }
        }
        Edit::Set { at: i, byte } => {
            if !token.is_empty() {
                let i = usize::from(i) % token.len();
                token[i] = byte;
            }
        }
        Edit::Insert { at: i, byte } => {
            let i = at(i, token.len());
            token.insert(i, byte);
        }
        Edit::Delete { at: i } => {
            if !token.is_empty() {
                let i = usize::from(i) % token.len();
                token.remove(i);
            }
        }
        Edit::Truncate { len } => token.truncate(usize::from(len)),
        Edit::Duplicate { at: i, len } => {
            let i = at(i, token.len());
            let end = (i + usize::from(len)).min(token.len());
            let piece = token[i..end].to_vec();
            token.splice(i..i, piece);
        }
        Edit::Tail { part, bits } => {
            // The end of dot-separated part `part` (0..=2).
            let mut ends = token
                .iter()
                .enumerate()
                .filter(|&(_, &b)| b == b'.')
                .map(|(i, _)| i)
                .collect::<Vec<_>>();
            ends.push(token.len());
            let Some(&end) = ends.get(usize::from(part % 3)) else {
                return;
            };
            let start = if part % 3 == 0 {
                0
            } else {
                ends[usize::from(part % 3) - 1] + 1
            };
            let unused = match (end - start.min(end)) % 4 {
                2 => 4,
                3 => 2,
                _ => return,
            };
            let Some(pos) = ALPHABET
                .iter()
                .position(|&c| Some(&c) == token.get(end.wrapping_sub(1)))
            else {
                return;
            };
            let mask = (1usize << unused) - 1;
            token[end - 1] = ALPHABET[(pos & !mask) | (usize::from(bits) & mask)];
        }
    }
}

fuzz_target!(|input: Input| {
    let f = fixture();
    // At most one link past the delegation limit.
    let tokens = &input.tokens[..input.tokens.len().min(5)];
    // Every token signed for this input, the presented one last.
    let mut all: Vec<String> = Vec::new();
    if tokens.is_empty() {
        all.push(sign(&empty_token(), 0, None));
    }
    for (depth, t) in tokens.iter().enumerate().rev() {
        let link = all.last().map(String::as_str);
        let signed = sign(t, depth, link);
        all.push(signed);
    }
    let signed = all.last().expect("one token").clone();
    let mut bytes = signed.clone().into_bytes();
    for e in input.edits.iter().take(8) {
        apply(&mut bytes, e);
    }
    let presented = String::from_utf8_lossy(&bytes);
    let audience = input
        .audience
        .as_ref()
        .map_or_else(|| OWN.to_owned(), Who::s);
    let r = f.engine.verify_at(&presented, &audience, NOW);
    check_outcome(&presented, &audience, &r);
    // Accepted means exactly one of the texts the key signed (a link of the
    // chain is itself a signed token, so it counts).
    if r.is_ok() && !all.iter().any(|t| *t == presented) {
        panic!("an edited token was accepted:\nsigned:    {signed}\npresented: {presented}");
    }
});

/// The token of an input with none: every member its default.
fn empty_token() -> Token {
    Token {
        header: Header {
            alg: F::Default,
            kid: F::Default,
            typ: None,
            extra: Vec::new(),
        },
        claims: Claims {
            iss: F::Default,
            sub: F::Default,
            aud: F::Default,
            iat: F::Default,
            nbf: F::Default,
            exp: F::Default,
            jti: F::Default,
            one_time: None,
            act_sub: F::Default,
            extra: Vec::new(),
        },
        raw_header: None,
        raw_payload: None,
    }
}
