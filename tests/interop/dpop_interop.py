"""DPoP (RFC 9449) interop for tokend's integration tests, with PyJWT and
`cryptography` as the independent implementation (driven by tests/it/dpop.rs).

check PROOF TOKEN METHOD URI
    Verifies a proof tokend made: PyJWT checks the ES256 signature under the
    header's public jwk; this script checks typ, htm, htu, iat, ath, and that
    the RFC 7638 thumbprint of the jwk (computed here) is the token's
    cnf.jkt. Prints the thumbprint.
make KEY_PEM TOKEN METHOD URI
    Makes a proof with PyJWT for TOKEN, signed by the P-256 key in KEY_PEM
    (PKCS#8), for tokend to verify. Prints it.
bearer JWKS_FILE TOKEN AUDIENCE ISSUER
    Verifies TOKEN as a plain bearer verifier does (the key chosen by the
    header kid from the published JWKS, as PyJWKClient does). Prints
    "accepted" or "refused: <why>".
every JWKS_FILE TOKEN AUDIENCE ISSUER
    Verifies TOKEN as a careless bearer verifier does: ignoring the header
    kid, it tries every RSA key of the JWKS until one verifies. Prints
    "accepted by <kid>" or "refused: tried <n> keys".
"""
import base64
import hashlib
import json
import secrets
import sys
import time

import jwt
from cryptography.hazmat.primitives import serialization


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def thumbprint(jwk):
    canonical = json.dumps(
        {"crv": jwk["crv"], "kty": jwk["kty"], "x": jwk["x"], "y": jwk["y"]},
        separators=(",", ":"),
        sort_keys=True,
    )
    return b64(hashlib.sha256(canonical.encode()).digest())


def check(proof, token, method, uri):
    header = jwt.get_unverified_header(proof)
    assert header["typ"] == "dpop+jwt", header
    assert header["alg"] == "ES256", header
    jwk = header["jwk"]
    assert "d" not in jwk, "private key in the proof"
    key = jwt.PyJWK.from_dict(jwk, algorithm="ES256")
    claims = jwt.decode(proof, key.key, algorithms=["ES256"])
    assert claims["htm"] == method, claims
    assert claims["htu"] == uri.split("?")[0].split("#")[0], claims
    assert abs(claims["iat"] - time.time()) < 300, claims
    assert len(unb64(claims["jti"])) >= 12, "jti under 96 bits"
    assert claims["ath"] == b64(hashlib.sha256(token.encode()).digest()), claims
    token_claims = json.loads(unb64(token.split(".")[1]))
    jkt = thumbprint(jwk)
    assert token_claims["cnf"]["jkt"] == jkt, (token_claims["cnf"], jkt)
    print(jkt)


def make(key_pem, token, method, uri):
    with open(key_pem, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    numbers = key.public_key().public_numbers()
    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "x": b64(numbers.x.to_bytes(32, "big")),
        "y": b64(numbers.y.to_bytes(32, "big")),
    }
    claims = {
        "jti": secrets.token_urlsafe(16),
        "htm": method,
        "htu": uri,
        "iat": int(time.time()),
        "ath": b64(hashlib.sha256(token.encode()).digest()),
    }
    print(jwt.encode(claims, key, algorithm="ES256", headers={"typ": "dpop+jwt", "jwk": jwk}))


def bearer(jwks_file, token, audience, issuer):
    with open(jwks_file) as f:
        jwks = jwt.PyJWKSet.from_dict(json.load(f))
    kid = jwt.get_unverified_header(token)["kid"]
    try:
        key = jwks[kid]
        jwt.decode(token, key.key, algorithms=["RS256"], audience=audience, issuer=issuer)
    except (KeyError, jwt.PyJWTError) as e:
        print(f"refused: {type(e).__name__}: {e}")
        return
    print("accepted")


def every(jwks_file, token, audience, issuer):
    with open(jwks_file) as f:
        jwks = jwt.PyJWKSet.from_dict(json.load(f))
    for key in jwks.keys:
        try:
            jwt.decode(token, key.key, algorithms=["RS256"], audience=audience, issuer=issuer)
        except jwt.PyJWTError:
            continue
        print(f"accepted by {key.key_id}")
        return
    print(f"refused: tried {len(jwks.keys)} keys")


if __name__ == "__main__":
    {"check": check, "make": make, "bearer": bearer, "every": every}[sys.argv[1]](*sys.argv[2:])
