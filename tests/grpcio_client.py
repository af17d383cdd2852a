"""Calls one unary gRPC method through grpcio, i.e. the gRPC C core, with raw request bytes.

    grpcio_client.py TARGET METHOD REQUEST_HEX [CALLS]

TARGET is a grpcio target such as unix:/run/x.sock or unix:///run/x.sock; METHOD the full
method path (/package.Service/Method). All CALLS calls (default 1) share one channel, so the
later ones reuse the connection and the HPACK dynamic table the first one filled.

Prints "pid <our pid>", then one line per call: "ok <response hex>" or
"error <status code name> <details>". No protobuf code generation: bytes in, bytes out.
"""

import os
import sys

import grpc

CALL_TIMEOUT_SECONDS = 10


def main() -> int:
    if len(sys.argv) not in (4, 5):
        print(__doc__, file=sys.stderr)
        return 2
    target, method, request_hex = sys.argv[1:4]
    calls = int(sys.argv[4]) if len(sys.argv) == 5 else 1
    request = bytes.fromhex(request_hex)
    print("pid", os.getpid(), flush=True)
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        for _ in range(calls):
            try:
                response = call(request, timeout=CALL_TIMEOUT_SECONDS)
            except grpc.RpcError as err:
                details = (err.details() or "").replace("\n", " ")
                print("error", err.code().name, details, flush=True)
            else:
                print("ok", response.hex(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
