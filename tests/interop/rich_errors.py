"""Rich gRPC errors for tokend's integration tests (driven by
tests/it/ecosystem.rs): a stock grpcio client reads the google.rpc.Status
of refused Verify calls with grpcio-status (`rpc_status.from_call`).

Usage: rich_errors.py SOCKET TOKEN
Verifies TOKEN for audience `ledger` (refused: wrong_audience) and `abc`
(refused: malformed); prints one JSON object with what the client saw.
"""
import json
import sys

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


def field(number, text):
    """A proto3 string field, encoded by hand: no generated stubs needed."""
    data = text.encode()
    out = bytes([number << 3 | 2])
    n = len(data)
    while n > 0x7F:
        out += bytes([n & 0x7F | 0x80])
        n >>= 7
    return out + bytes([n]) + data


def refusal(verify, token, audience):
    try:
        verify(field(1, token) + field(2, audience), timeout=10)
    except grpc.RpcError as call:
        status = rpc_status.from_call(call)
        if status is None:
            raise SystemExit("no google.rpc.Status in grpc-status-details-bin")
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                trailers = dict(call.trailing_metadata() or ())
                return call, info, trailers
        raise SystemExit("no ErrorInfo among the details")
    raise SystemExit("the call was not refused")


def main(socket, token):
    with grpc.insecure_channel("unix://" + socket) as channel:
        verify = channel.unary_unary(
            "/tokend.v1.TokenService/Verify",
            request_serializer=None,
            response_deserializer=None,
        )
        call, info, trailers = refusal(verify, token, "ledger")
        _, malformed, _ = refusal(verify, "abc", "")
    print(json.dumps({
        "code": call.code().name,
        "reason": info.reason,
        "domain": info.domain,
        "metadata": dict(info.metadata),
        "tokend_reason": trailers.get("tokend-reason"),
        "malformed_reason": malformed.reason,
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
