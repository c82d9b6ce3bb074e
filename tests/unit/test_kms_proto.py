"""The KMS v2 messages: generated from the committed .proto, and on the wire as kube-apiserver's."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from sidecar.kms.v2 import api_grpc, api_pb2

ROOT = Path(__file__).parents[2]
GENERATED = ROOT / "sidecar" / "kms" / "v2"


def test_generated_modules_match_the_proto(tmp_path: Path) -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools (the dev extra) regenerates the modules")
    subprocess.run([str(ROOT / "scripts" / "gen-kms-proto"), str(tmp_path)], check=True)
    fresh = tmp_path / "sidecar" / "kms" / "v2"
    # The service stub is plain text; the messages are compared as descriptors, which do not
    # change with the generator's version banner.
    assert (fresh / "api_grpc.py").read_text() == (GENERATED / "api_grpc.py").read_text()
    descriptors = tmp_path / "api.desc"
    protoc = [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT}"]
    subprocess.run(
        [*protoc, f"--descriptor_set_out={descriptors}", "sidecar/kms/v2/api.proto"],
        check=True,
        cwd=ROOT,
    )
    expected = descriptor_pb2.FileDescriptorSet.FromString(descriptors.read_bytes()).file[0]
    committed = descriptor_pb2.FileDescriptorProto.FromString(api_pb2.DESCRIPTOR.serialized_pb)
    assert _without_json_names(committed) == _without_json_names(expected)


def _without_json_names(
    file: descriptor_pb2.FileDescriptorProto,
) -> descriptor_pb2.FileDescriptorProto:
    """``file`` without the derived ``json_name``s, which protoc keeps out of generated code."""

    def strip(message: descriptor_pb2.DescriptorProto) -> None:
        for field in message.field:
            field.ClearField("json_name")
        for nested in message.nested_type:
            strip(nested)

    for message in file.message_type:
        strip(message)
    return file


def test_method_paths_are_the_apiservers() -> None:
    class Service(api_grpc.KeyManagementServiceBase):
        async def Status(self, stream: object) -> None: ...
        async def Encrypt(self, stream: object) -> None: ...
        async def Decrypt(self, stream: object) -> None: ...

    paths = set(Service().__mapping__())
    assert paths == {
        "/v2.KeyManagementService/Status",
        "/v2.KeyManagementService/Encrypt",
        "/v2.KeyManagementService/Decrypt",
    }


def test_field_numbers_are_the_apiservers() -> None:
    """Bytes as kube-apiserver's Go code puts them on the wire (field number << 3 | wire type)."""
    status = api_pb2.StatusResponse.FromString(b"\x0a\x02v2\x12\x02ok\x1a\x02k1")
    assert (status.version, status.healthz, status.key_id) == ("v2", "ok", "k1")
    encrypt = api_pb2.EncryptRequest.FromString(b"\x0a\x03abc\x12\x03uid")
    assert (encrypt.plaintext, encrypt.uid) == (b"abc", "uid")
    # annotations: map entry (field 3) holding key (1) and value (2)
    sealed = api_pb2.EncryptResponse.FromString(
        b"\x0a\x02ct\x12\x02k1\x1a\x0b\x0a\x05a.b.c\x12\x02vv"
    )
    assert (sealed.ciphertext, sealed.key_id, dict(sealed.annotations)) == (
        b"ct",
        "k1",
        {"a.b.c": b"vv"},
    )
    decrypt = api_pb2.DecryptRequest.FromString(
        b"\x0a\x02ct\x12\x03uid\x1a\x02k1\x22\x0b\x0a\x05a.b.c\x12\x02vv"
    )
    assert (decrypt.ciphertext, decrypt.uid, decrypt.key_id) == (b"ct", "uid", "k1")
    assert dict(decrypt.annotations) == {"a.b.c": b"vv"}
    assert api_pb2.DecryptResponse.FromString(b"\x0a\x02pt").plaintext == b"pt"
