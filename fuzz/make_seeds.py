#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/<target>/seed-* (committed).

Needs only Python 3 and the `openssl` command (RS256 signatures are
deterministic, so a rerun rewrites the same bytes). The constants below must
match fuzz/src/lib.rs; the harness checks at start that seed-valid.jwt
verifies, so a mismatch fails loudly instead of fuzzing a dead fixture.

Run from anywhere: python3 fuzz/make_seeds.py
"""

import base64
import hashlib
import json
import pathlib
import re
import subprocess

FUZZ = pathlib.Path(__file__).resolve().parent
ROOT = FUZZ.parent
KEY = ROOT / "keys" / "test-only" / "fuzz-peer.pk8.pem"
CORPUS = FUZZ / "corpus"

# Keep in step with fuzz/src/lib.rs.
NOW = 1_800_000_000
OWN = "spiffe://bank.internal/ledger"
PEER = "spiffe://bank.internal/payments"
REVOKED_KID = "revoked-by-payments"


def b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def key_components():
    text = subprocess.run(
        ["openssl", "pkey", "-in", str(KEY), "-noout", "-text"],
        check=True, capture_output=True, text=True,
    ).stdout
    m = re.search(r"modulus:\s*\n((?:\s+[0-9a-f:]+\n)+)", text)
    n = bytes.fromhex(re.sub(r"[\s:]", "", m.group(1))).lstrip(b"\0")
    e = int(re.search(r"publicExponent: (\d+)", text).group(1))
    e = e.to_bytes((e.bit_length() + 7) // 8, "big")
    return n, e


N, E = key_components()
# RFC 7638 thumbprint, as tokend derives kids.
KID = b64(hashlib.sha256(
    json.dumps({"e": b64(E), "kty": "RSA", "n": b64(N)}, separators=(",", ":")).encode()
).digest())
JWK = {"kty": "RSA", "kid": KID, "alg": "RS256", "use": "sig", "n": b64(N), "e": b64(E)}


def sign_raw(header: str, payload: str) -> str:
    signing_input = f"{b64(header.encode())}.{b64(payload.encode())}"
    sig = subprocess.run(
        ["openssl", "dgst", "-sha256", "-sign", str(KEY)],
        input=signing_input.encode(), check=True, capture_output=True,
    ).stdout
    return f"{signing_input}.{b64(sig)}"


def compact(v) -> str:
    return json.dumps(v, separators=(",", ":"))


def token(claims: dict, kid: str = KID, alg: str = "RS256") -> str:
    return sign_raw(compact({"alg": alg, "typ": "JWT", "kid": kid}), compact(claims))


def claims(iss=PEER, aud=OWN, age=10, ttl=300, jti="j-1", **extra):
    iat = NOW - age
    c = {"iss": iss, "sub": iss, "aud": aud, "iat": iat, "nbf": iat, "exp": iat + ttl, "jti": jti}
    c.update(extra)
    return c


def write(target: str, name: str, data) -> None:
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / f"seed-{name}").write_bytes(data if isinstance(data, bytes) else data.encode())


# --- verify_token: compact JWTs at NOW, for the engine trusting PEER.
write("verify_token", "valid.jwt", token(claims()))
write("verify_token", "aud-list.jwt", token(claims(aud=["spiffe://bank.internal/x", OWN], jti="j-2")))
write("verify_token", "one-time.jwt", token(claims(jti="j-3", one_time=True, role="reader")))
link = token(claims(aud=PEER, age=20, ttl=400, jti="link"))
outer = claims(jti="outer")
outer["act"] = {"sub": PEER, "prev_token": link}
write("verify_token", "delegated.jwt", token(outer))
write("verify_token", "expired.jwt", token(claims(age=1000, jti="j-4")))
write("verify_token", "unknown-kid.jwt", token(claims(jti="j-5"), kid="not-a-payments-kid"))
write("verify_token", "revoked-kid.jwt", token(claims(jti="j-6"), kid=REVOKED_KID))
write("verify_token", "hs256.jwt", token(claims(jti="j-7"), alg="HS256"))
write("verify_token", "own-issuer.jwt", token(claims(iss=OWN, jti="j-8")))
bad = token(claims(jti="j-9"))
write("verify_token", "bad-signature.jwt", bad[:-3] + ("A" if bad[-3] != "A" else "B") + bad[-2:])

# --- jwk_import: JWK JSON documents.
write("jwk_import", "fixture.json", compact(JWK))
# RFC 7638 section 3.1's example key (2048 bits, no kid: the thumbprint is derived).
write("jwk_import", "rfc7638.json", compact({
    "kty": "RSA", "e": "AQAB",
    "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
}))
write("jwk_import", "short.json", compact({"kty": "RSA", "n": b64(b"\xff" * 128), "e": "AQAB"}))
write("jwk_import", "ec.json", compact({"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}))


# --- peer_key_set: protobuf PeerKeySet messages (tokend.v1, proto/tokend/v1/peer.proto).
def varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_bytes(num: int, data: bytes) -> bytes:
    return varint(num << 3 | 2) + varint(len(data)) + data


def peer_key_set(issuer, jwks_json, revoked=(), version=0, expires=None) -> bytes:
    out = field_bytes(1, issuer.encode()) + field_bytes(2, jwks_json.encode())
    for kid in revoked:
        out += field_bytes(3, kid.encode())
    if version:
        out += varint(4 << 3 | 0) + varint(version)
    for kid, t in (expires or {}).items():
        entry = field_bytes(1, kid.encode()) + varint(2 << 3 | 0) + varint(t)
        out += field_bytes(5, entry)
    return out


write("peer_key_set", "fixture.pb", peer_key_set(
    PEER, compact({"keys": [JWK]}), revoked=[REVOKED_KID], version=7, expires={KID: NOW + 3600}))
write("peer_key_set", "empty.pb", peer_key_set(PEER, compact({"keys": []}), version=1))
write("peer_key_set", "duplicate-kid.pb", peer_key_set(PEER, compact({"keys": [JWK, JWK]})))
write("peer_key_set", "revokes-its-key.pb", peer_key_set(PEER, compact({"keys": [JWK]}), revoked=[KID]))

# --- config_toml: the README's example, and small variations.
readme = (ROOT / "README.md").read_text()
section = readme.split("## Configuration", 1)[1]
example = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
write("config_toml", "readme-example.toml", example)
write("config_toml", "minimal.toml", 'name = "ledger"\ntrust_domain = "bank.internal"\n')
write("config_toml", "peer-api.toml", """name = "ledger"
trust_domain = "bank.internal"

[peer_api]
listen = "127.0.0.1:7443"
ca = "ca.pem"
cert = "cert.pem"
key = "key.pem"

[[peers]]
name = "payments"
address = "https://payments.bank.internal:7443"
""")

print(f"kid {KID}; seeds written under {CORPUS}")
