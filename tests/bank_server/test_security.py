"""Bearer token and TLS on real servers."""

import shutil
import subprocess

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from bank_server.client import BankClient, BankRpcError
from protos import bank_pb2, bank_pb2_grpc


def test_token_is_required_for_bank_calls_but_not_for_health(make_bank):
    bank = make_bank(2, 10, 4, "float32", token="s3cret")
    with BankClient(bank.addresses, token="s3cret") as client:
        assert client.lookup([1, 2]).shape == (2, 4)
    with pytest.raises(BankRpcError) as info:
        BankClient(bank.addresses, token="wrong")
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in info.value.details
    with pytest.raises(BankRpcError) as info:
        BankClient(bank.addresses)
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(bank.addresses[0]) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_bank_service(make_bank):
    bank = make_bank(1, 10, 4, "float32")
    with grpc.insecure_channel(bank.addresses[0]) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in answer.list_services_response.service}
    assert "instdisc.bank.v1.MemoryBank" in names and "grpc.health.v1.Health" in names


def test_tls_with_a_self_signed_certificate(make_bank, tmp_path):
    assert shutil.which("openssl"), "openssl is a test dependency: apt-get install openssl (.ci/run does)"
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    bank = make_bank(1, 10, 4, "float32", tls_cert=str(cert), tls_key=str(key), token="t")
    with BankClient(bank.addresses, token="t", tls_ca=str(cert)) as client:
        np.testing.assert_equal(client.lookup([3]).shape, (1, 4))
    with grpc.insecure_channel(bank.addresses[0]) as channel:  # plaintext to a TLS port fails
        with pytest.raises(grpc.RpcError):
            bank_pb2_grpc.MemoryBankStub(channel).Describe(bank_pb2.DescribeRequest(), timeout=3)


def test_serve_refuses_an_empty_or_missing_token_file_with_the_shared_reader(tmp_path, capsys):
    from bank_server.cli import main

    empty = tmp_path / "empty"
    empty.write_text("\n")
    base = ["--shard-id", "0", "--num-shards", "1", "--rows", "10", "--port", "0"]
    assert main([*base, "--token-file", str(empty)]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "empty" in err
    assert main([*base, "--token-file", str(tmp_path / "missing")]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
