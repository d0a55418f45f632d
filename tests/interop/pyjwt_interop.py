"""PyJWT interop for tokend's integration tests (driven by tests/it/interop.rs).

verify JWKS_FILE TOKEN AUDIENCE ISSUER
    Verifies a tokend token with PyJWT and the issuer's published JWKS;
    prints the claims as JSON.
sign JWKS_OUT ISSUER AUDIENCE
    Generates an RSA-2048 key, writes its public JWKS to JWKS_OUT, and prints
    an RS256 token signed by PyJWT that tokend must accept.
"""
import json
import sys
import time
import uuid

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa


def verify(jwks_file, token, audience, issuer):
    with open(jwks_file) as f:
        jwks = jwt.PyJWKSet.from_dict(json.load(f))
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in jwks.keys if k.key_id == kid)
    claims = jwt.decode(
        token,
        key.key,
        algorithms=["RS256"],
        audience=audience,
        issuer=issuer,
        options={"require": ["exp", "iat", "nbf", "iss", "sub", "aud", "jti"]},
    )
    print(json.dumps(claims))


def sign(jwks_out, issuer, audience):
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    public_jwk.update({"kid": "pyjwt-key-1", "alg": "RS256", "use": "sig"})
    with open(jwks_out, "w") as f:
        json.dump({"keys": [public_jwk]}, f)
    now = int(time.time())
    claims = {
        "iss": issuer, "sub": issuer, "aud": audience,
        "iat": now, "nbf": now, "exp": now + 120, "jti": uuid.uuid4().hex,
        "scope": "read:ledger",
    }
    print(jwt.encode(claims, private, algorithm="RS256", headers={"kid": "pyjwt-key-1"}))


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"verify": verify, "sign": sign}[mode](*args)
