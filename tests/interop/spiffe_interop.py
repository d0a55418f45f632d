"""SPIFFE Workload API interop for tokend's integration tests (driven by
tests/it/interop.rs), using the stock PyPI `spiffe` client unchanged.

Usage: spiffe_interop.py SOCKET AUDIENCE TRUST_DOMAIN
Prints one JSON object describing what the client saw.
"""
import base64
import json
import sys

from spiffe import JwtSvid, TrustDomain, WorkloadApiClient


def tamper(token):
    head, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["exp"] += 600
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return ".".join([head, forged, sig])


def main(socket, audience, trust_domain):
    out = {}
    with WorkloadApiClient(socket_path="unix://" + socket) as client:
        svid = client.fetch_jwt_svid(audience={audience})
        out["spiffe_id"] = str(svid.spiffe_id)
        out["audience"] = sorted(svid.audience)
        out["token"] = svid.token
        validated = client.validate_jwt_svid(svid.token, audience)
        out["validated_spiffe_id"] = str(validated.spiffe_id)
        bundles = client.fetch_jwt_bundles()
        bundle = bundles.get_bundle_for_trust_domain(TrustDomain(trust_domain))
        out["bundle_kids"] = sorted(bundle.jwt_authorities.keys()) if bundle else []
        # Offline validation by the client library itself, with the bundle tokend served.
        offline = JwtSvid.parse_and_validate(svid.token, bundle, {audience})
        out["offline_spiffe_id"] = str(offline.spiffe_id)
        try:
            client.validate_jwt_svid(tamper(svid.token), audience)
            out["tampered"] = "accepted"
        except Exception as err:  # the client wraps the gRPC status
            out["tampered"] = str(err)
        try:
            client.validate_jwt_svid(svid.token, "someone-else")
            out["wrong_audience"] = "accepted"
        except Exception as err:
            out["wrong_audience"] = str(err)
    print(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
