"""A KMS v2 client that calls the sidecar as kube-apiserver does: gRPC (grpcio, not the server's
library) over the Unix socket named by ``endpoint: unix:///...``, one method path per call.

Run as a script (``python -m tests.kms_client SOCKET METHOD``) it prints the gRPC status code
name of one call, for tests that call as another user.
"""

from __future__ import annotations

import sys
from typing import Any

import grpc

from sidecar.kms.v2 import api_pb2

SERVICE = "/v2.KeyManagementService/"
_TYPES: dict[str, tuple[Any, Any]] = {
    "Status": (api_pb2.StatusRequest, api_pb2.StatusResponse),
    "Encrypt": (api_pb2.EncryptRequest, api_pb2.EncryptResponse),
    "Decrypt": (api_pb2.DecryptRequest, api_pb2.DecryptResponse),
}
#: kube-apiserver's default timeout for one KMS call.
APISERVER_TIMEOUT = 3.0


class ApiServer:
    """Blocking calls on one channel (the apiserver keeps one connection per provider)."""

    def __init__(self, socket_path: str) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket_path}")
        self._calls = {
            name: self.channel.unary_unary(
                SERVICE + name,
                request_serializer=request.SerializeToString,
                response_deserializer=response.FromString,
            )
            for name, (request, response) in _TYPES.items()
        }

    def status(self) -> api_pb2.StatusResponse:
        return self._calls["Status"](api_pb2.StatusRequest(), timeout=APISERVER_TIMEOUT)

    def encrypt(self, plaintext: bytes, uid: str = "enc-1") -> api_pb2.EncryptResponse:
        request = api_pb2.EncryptRequest(plaintext=plaintext, uid=uid)
        return self._calls["Encrypt"](request, timeout=APISERVER_TIMEOUT)

    def decrypt(
        self, ciphertext: bytes, key_id: str = "", uid: str = "dec-1", **annotations: bytes
    ) -> bytes:
        request = api_pb2.DecryptRequest(
            ciphertext=ciphertext, key_id=key_id, uid=uid, annotations=annotations
        )
        reply: api_pb2.DecryptResponse = self._calls["Decrypt"](request, timeout=APISERVER_TIMEOUT)
        return reply.plaintext

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ApiServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class AsyncApiServer:
    """The same calls on a ``grpc.aio`` channel, for hundreds in flight at once."""

    def __init__(self, socket_path: str) -> None:
        self.channel = grpc.aio.insecure_channel(f"unix://{socket_path}")
        self._decrypt = self.channel.unary_unary(
            SERVICE + "Decrypt",
            request_serializer=api_pb2.DecryptRequest.SerializeToString,
            response_deserializer=api_pb2.DecryptResponse.FromString,
        )

    async def decrypt(self, ciphertext: bytes, uid: str = "dec") -> bytes:
        request = api_pb2.DecryptRequest(ciphertext=ciphertext, uid=uid)
        reply = await self._decrypt(request, timeout=APISERVER_TIMEOUT)
        return bytes(reply.plaintext)

    async def close(self) -> None:
        await self.channel.close()


def main(argv: list[str]) -> int:
    socket_path, method = argv
    with ApiServer(socket_path) as client:
        try:
            if method == "Encrypt":
                client.encrypt(b"\x00" * 32)
            elif method == "Decrypt":
                client.decrypt(b"sidecar:v1:AAAA")
            else:
                client.status()
        except grpc.RpcError as exc:
            print(exc.code().name)  # type: ignore[attr-defined]
            return 0
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
