"""Who may talk to a node: the cluster token and mutual TLS, over real gRPC on 127.0.0.1.

Each refusal test makes 100 attempts per method and case on real channels, with messages that
are valid in every other respect (a control call with the right credentials is accepted), and
checks that the node's weight, state and counters are untouched by what it refused.
"""

from __future__ import annotations

import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from conftest import node_config, wait_until
from cryptography import x509
from cryptography.x509 import verification
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gosgd_p2p import GossipNode, NodeConfig, certs
from gosgd_p2p.security import TLS_TARGET_NAME, TOKEN_METADATA_KEY, Credentials
from gosgd_p2p.v1 import gossip_pb2 as pb
from gosgd_p2p.wire import PROTOCOL_VERSION, grpc_options, split_for_streaming

pytestmark = [pytest.mark.nodes, pytest.mark.timeout(60)]

SERVICE = "/gosgd_p2p.v1.Gossip"
ATTEMPTS = 100
TOKEN = "5f" * 32  # a 32-byte secret in hex, as gosgd-certs writes it
WRONG_TOKENS = ["", "0" * 64, TOKEN[:-1], TOKEN + "0", TOKEN.upper(), "5f"]


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 2))


def cfg(node_id: str, **kw) -> NodeConfig:
    return node_config(node_id, kw.pop("cluster", "sec"), **kw)


def snapshot(node: GossipNode) -> list[torch.Tensor]:
    return [t.clone() for t in node.state]


def assert_state(node: GossipNode, before: list[torch.Tensor]) -> None:
    for x, x0 in zip(node.state, before, strict=True):
        assert torch.equal(x, x0)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


class Calls:
    """Every Gossip method of one node as a raw call on `channel`, each with a valid request.

    Valid in every respect but the credentials: the push is a well-formed message for the
    node's model and cluster, the fetch asks for its state, and so on.
    """

    def __init__(self, channel: grpc.Channel, node: GossipNode) -> None:
        header = pb.StateHeader(
            sender_id="intruder", message_id=7, weight=0.5, fingerprint=node.layout.fingerprint,
            encoding=pb.ENCODING_FP32, payload_bytes=node.layout.nbytes, cluster="sec",
            protocol_version=PROTOCOL_VERSION, sender_address="127.0.0.1:9",
        )  # fmt: skip
        payload = memoryview(torch.zeros(node.layout.numel).numpy()).cast("B")
        self._chunks = list(split_for_streaming(header, payload))
        self._push = channel.stream_unary(
            f"{SERVICE}/PushState", request_serializer=None, response_deserializer=None
        )
        self._fetch = channel.unary_stream(
            f"{SERVICE}/FetchState",
            request_serializer=pb.FetchRequest.SerializeToString,
            response_deserializer=None,
        )
        self._fetch_request = pb.FetchRequest(
            node_id="intruder", cluster="sec", fingerprint=node.layout.fingerprint,
            protocol_version=PROTOCOL_VERSION,
        )  # fmt: skip
        self._hello = channel.unary_unary(
            f"{SERVICE}/Hello",
            request_serializer=pb.HelloRequest.SerializeToString,
            response_deserializer=pb.HelloReply.FromString,
        )
        self._hello_request = pb.HelloRequest(
            self=pb.PeerInfo(node_id="intruder", address="127.0.0.1:9"), cluster="sec",
            protocol_version=PROTOCOL_VERSION,
            peers=[pb.PeerInfo(node_id="other", address="127.0.0.1:10")],
        )  # fmt: skip
        self._resolve = channel.unary_unary(
            f"{SERVICE}/ResolvePush",
            request_serializer=pb.ResolveRequest.SerializeToString,
            response_deserializer=pb.ResolveReply.FromString,
        )
        self._resolve_request = pb.ResolveRequest(sender_id="intruder", message_id=7)

    def push(self, metadata=None) -> object:
        return self._push(iter(self._chunks), timeout=5, metadata=metadata)

    def fetch(self, metadata=None) -> object:
        return list(self._fetch(self._fetch_request, timeout=5, metadata=metadata))

    def hello(self, metadata=None) -> object:
        return self._hello(self._hello_request, timeout=5, metadata=metadata)

    def resolve(self, metadata=None) -> object:
        return self._resolve(self._resolve_request, timeout=5, metadata=metadata)


def refused(call: Callable[[], object], attempts: int = ATTEMPTS) -> list[grpc.StatusCode]:
    """Make `attempts` calls; each must raise grpc.RpcError. Returns their status codes."""
    codes = []
    for i in range(attempts):
        try:
            call()
        except grpc.RpcError as err:
            codes.append(err.code())
        else:
            pytest.fail(f"attempt {i} succeeded")
    return codes


# --- cluster token ----------------------------------------------------------------------------


@pytest.fixture
def token_file(tmp_path: Path) -> str:
    return write(tmp_path / "token", TOKEN + "\n")  # the newline is not part of the secret


def test_every_call_without_the_right_token_is_refused_and_changes_nothing(
    token_file: str,
) -> None:
    a = GossipNode(make_model(), cfg("a", p=0.0, token_file=token_file))
    channel = grpc.insecure_channel(a.address, options=grpc_options())
    calls = Calls(channel, a)
    with a:
        before = snapshot(a)
        methods = {"push": calls.push, "fetch": calls.fetch, "hello": calls.hello}
        methods["resolve"] = calls.resolve
        for name, method in methods.items():
            codes = refused(method)
            codes += refused(lambda m=method: m(((TOKEN_METADATA_KEY, "x"),)), 1)
            for i in range(ATTEMPTS - 1):
                wrong = WRONG_TOKENS[i % len(WRONG_TOKENS)]
                codes += refused(lambda m=method, w=wrong: m(((TOKEN_METADATA_KEY, w),)), 1)
            assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 2 * ATTEMPTS, name
        assert a.counters.snapshot() == {"rejected_token": 4 * 2 * ATTEMPTS}
        assert a.weight == 1.0 and len(a.inbox) == 0 and a.peers.all() == []
        assert_state(a, before)

        # the health check needs no token (probes do not hold the secret)
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "gosgd_p2p.v1.Gossip"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        # control: the same push with the token is a valid message, taken and merged once
        ack = pb.PushAck.FromString(calls.push(((TOKEN_METADATA_KEY, TOKEN),)))
        assert ack.receiver_id == "a" and not ack.duplicate
        assert a.counters.get("pushes_received") == 1
        assert a.finish() == 1.5
    channel.close()


def test_nodes_sharing_the_token_gossip_and_another_token_cannot_push(
    tmp_path: Path, token_file: str
) -> None:
    # a never steps, so its inbox keeps every push it takes
    a = GossipNode(make_model(), cfg("a", p=0.0, inbox_size=16, token_file=token_file))
    b = GossipNode(make_model(), cfg("b", p=1.0, peers=[a.address], token_file=token_file))
    with a, b:
        for _ in range(5):
            b.step()
            wait_until(lambda: b.in_flight == 0, 30, "b's push to settle")
        assert b.finish() == 0.5**5
        received = a.counters.get("pushes_received")
        assert received == 5 and a.counters.snapshot().get("rejected_token") is None
        before = snapshot(a)

        other = write(tmp_path / "other", "6e" * 32)
        with GossipNode(make_model(), cfg("c", p=1.0, peers=[a.address], token_file=other)) as c:
            c.peers.observe(a.address, "a", confirmed=True)  # push despite the failed Hellos
            for _ in range(5):
                c.step()
                wait_until(lambda: c.in_flight == 0, 30, "c's push to settle")
            assert c.finish() == 1.0  # nothing left c for good
        started = c.counters.get("pushes_started")
        assert started >= 1 and c.counters.get("pushes_returned") == started
        assert a.counters.get("rejected_token") > c.counters.get("pushes_started")  # + Hellos
        assert a.counters.get("pushes_received") == received
        assert_state(a, before)  # nothing merged yet: a has not stepped since

        assert a.finish() + b.weight == 2.0  # sum-weight exactly conserved


# --- mutual TLS -------------------------------------------------------------------------------


class Pki:
    """A cluster CA with certificates for nodes a and b, and a foreign CA's "intruder"."""

    def __init__(self, root: Path) -> None:
        self.cluster = root / "cluster"
        self.foreign = root / "foreign"
        certs.write_cluster(self.cluster, ["a", "b"])
        certs.write_cluster(self.foreign, ["intruder"])

    def files(self, name: str, ca: Path | None = None) -> dict[str, str]:
        """NodeConfig TLS fields for `name`, trusting `ca` (default: the cluster CA)."""
        folder = self.foreign if name == "intruder" else self.cluster
        return {
            "tls_cert": str(folder / f"{name}.pem"),
            "tls_key": str(folder / f"{name}.key"),
            "tls_ca": str(ca or self.cluster / "ca.pem"),
        }

    def channel(self, address: str, name: str | None) -> grpc.Channel:
        """A TLS channel trusting the cluster CA, presenting `name`'s certificate (or none)."""
        ca = (self.cluster / "ca.pem").read_bytes()
        if name is None:
            creds = grpc.ssl_channel_credentials(root_certificates=ca)
        else:
            files = self.files(name)
            creds = grpc.ssl_channel_credentials(
                root_certificates=ca,
                private_key=Path(files["tls_key"]).read_bytes(),
                certificate_chain=Path(files["tls_cert"]).read_bytes(),
            )
        options = grpc_options() + [("grpc.ssl_target_name_override", TLS_TARGET_NAME)]
        return grpc.secure_channel(address, creds, options=options)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def channels(make: Callable[[], grpc.Channel], per_channel: int = 10) -> Iterator[grpc.Channel]:
    """ATTEMPTS uses of fresh channels, `per_channel` uses each (a new handshake per channel)."""
    for _ in range(ATTEMPTS // per_channel):
        channel = make()
        try:
            for _ in range(per_channel):
                yield channel
        finally:
            channel.close()


def test_only_holders_of_a_cluster_certificate_get_through(pki: Pki) -> None:
    a = GossipNode(make_model(), cfg("a", p=0.0, rpc_timeout_s=1.0, **pki.files("a")))
    cases: dict[str, Callable[[], grpc.Channel]] = {
        "plaintext": lambda: grpc.insecure_channel(a.address, options=grpc_options()),
        "foreign certificate": lambda: pki.channel(a.address, "intruder"),
        "no client certificate": lambda: pki.channel(a.address, None),
    }
    with a:
        before = snapshot(a)
        for case, make in cases.items():
            for method in ("push", "fetch"):
                codes = []
                for channel in channels(make):
                    call = getattr(Calls(channel, a), method)
                    codes += refused(call, 1)
                # refused by the transport, before the node saw the call
                assert set(codes) == {grpc.StatusCode.UNAVAILABLE}, (case, method, set(codes))
                assert a.counters.snapshot() == {}, (case, method)
        assert a.weight == 1.0 and len(a.inbox) == 0 and a.peers.all() == []
        assert_state(a, before)

        # control: the same push over a channel with b's cluster certificate is taken
        channel = pki.channel(a.address, "b")
        ack = pb.PushAck.FromString(Calls(channel, a).push())
        assert ack.receiver_id == "a" and a.counters.get("pushes_received") == 1
        channel.close()
        assert a.finish() == 1.5


def test_cluster_nodes_gossip_over_mtls_and_an_intruder_cannot(pki: Pki) -> None:
    a = GossipNode(make_model(), cfg("a", p=0.0, inbox_size=16, **pki.files("a")))
    b = GossipNode(make_model(), cfg("b", p=1.0, peers=[a.address], **pki.files("b")))
    # the intruder knows the cluster CA (it is no secret) but holds a foreign certificate
    intruder = GossipNode(
        make_model(),
        cfg("intruder", p=1.0, peers=[a.address], forget_after_s=5.0, **pki.files("intruder")),
    )
    with a, b, intruder:
        for _ in range(5):
            b.step()
            wait_until(lambda: b.in_flight == 0, 30, "b's push to settle")
        assert b.finish() == 0.5**5
        received = a.counters.get("pushes_received")
        assert received == 5
        before = snapshot(a)

        # its Hellos failed, so it suspended a; make it try to push anyway
        intruder.peers.observe(a.address, "a", confirmed=True)
        for _ in range(5):
            intruder.step()
            wait_until(lambda: intruder.in_flight == 0, 30, "the intruder's push to settle")
        assert intruder.finish() == 1.0
        started = intruder.counters.get("pushes_started")
        assert started >= 1 and intruder.counters.get("pushes_returned") == started
        assert intruder.counters.get("pushes_lost_with_peer") == 0  # a TLS refusal is no maybe
        assert a.counters.get("pushes_received") == received
        assert_state(a, before)
        assert "intruder" not in [p.node_id for p in a.peers.all()]

        assert a.finish() + b.weight == 2.0


def test_an_intruder_trusting_only_its_own_ca_does_not_reach_the_node(pki: Pki) -> None:
    a = GossipNode(make_model(), cfg("a", p=0.0, **pki.files("a")))
    foreign_ca = pki.foreign / "ca.pem"
    intruder = GossipNode(
        make_model(), cfg("i", p=1.0, peers=[a.address], **pki.files("intruder", foreign_ca))
    )
    with a, intruder:
        before = snapshot(a)
        for _ in range(3):
            intruder.step()
            wait_until(lambda: intruder.in_flight == 0, 30, "the intruder's push to settle")
        assert intruder.finish() == 1.0
        assert a.counters.get("pushes_received") == 0
        assert a.finish() == 1.0
        assert_state(a, before)


# --- configuration errors ---------------------------------------------------------------------


def test_incomplete_tls_files_are_one_line_errors(pki: Pki) -> None:
    files = pki.files("a")
    for missing in ("tls_cert", "tls_key", "tls_ca"):
        some = {k: v for k, v in files.items() if k != missing}
        with pytest.raises(ValueError, match="needs all of") as info:
            Credentials.from_files(**some)
        assert "\n" not in str(info.value)
    for only in files:
        with pytest.raises(ValueError, match="needs all of"):
            Credentials.from_files(**{only: files[only]})
    with pytest.raises(ValueError, match="needs all of"):
        GossipNode(make_model(), cfg("a", tls_cert=files["tls_cert"]))


def test_unreadable_or_empty_secrets_are_one_line_errors(tmp_path: Path, pki: Pki) -> None:
    cases = {
        "missing": str(tmp_path / "nope"),
        "a folder": str(tmp_path),
        "empty": write(tmp_path / "empty", ""),
        "blank": write(tmp_path / "blank", " \n\n"),
    }
    for case, path in cases.items():
        with pytest.raises(ValueError, match="token file") as info:
            Credentials.from_files(token_file=path)
        assert "\n" not in str(info.value), case
        assert path in str(info.value), case
        files = dict(pki.files("a"), tls_key=path)
        with pytest.raises(ValueError, match="TLS key"):
            Credentials.from_files(**files)
    with pytest.raises(ValueError, match="token file"):
        GossipNode(make_model(), cfg("a", token_file=cases["missing"]))
    assert Credentials.from_files(token_file=write(tmp_path / "t", " s3cret \n")).token == b"s3cret"


@pytest.mark.parametrize("secret", ["s\u00e9cret", "tab\there", "bell\x07"])
def test_a_token_grpc_cannot_send_is_a_one_line_error(tmp_path: Path, secret: str) -> None:
    # gRPC metadata values are printable ASCII; any other token fails every call at the
    # sender (INTERNAL "Invalid metadata"), so the node would train alone without a word
    path = write(tmp_path / "token", secret)
    with pytest.raises(ValueError, match="token file") as info:
        Credentials.from_files(token_file=path)
    assert "\n" not in str(info.value)


# --- gosgd-certs ------------------------------------------------------------------------------


def gosgd_certs(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "gosgd-certs"
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=30)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_gosgd_certs_writes_a_ca_node_certificates_and_a_token(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    result = gosgd_certs("--out", str(out), "--nodes", "n0,n1", "--days", "30")
    assert result.returncode == 0, result.stderr
    assert "--tls-cert" in result.stdout and "--token-file" in result.stdout
    private = ["ca.key", "n0.key", "n1.key", "token"]
    for name in ["ca.pem", "n0.pem", "n1.pem", *private]:
        assert (out / name).is_file(), name
        assert str(out / name) in result.stdout
    for name in private:
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    token = (out / "token").read_text().strip()
    assert len(bytes.fromhex(token)) == 32

    ca = load(out / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    store = verification.Store([ca])
    for name in ("n0", "n1"):
        node = load(out / f"{name}.pem")
        node.verify_directly_issued_by(ca)
        san = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [TLS_TARGET_NAME, name]
        # a full RFC 5280 path validation, as a TLS server and as a TLS client
        builder = verification.PolicyBuilder().store(store)
        builder.build_server_verifier(x509.DNSName(TLS_TARGET_NAME)).verify(node, [])
        builder.build_client_verifier().verify(node, [])
        lifetime = node.not_valid_after_utc - node.not_valid_before_utc
        assert 30 <= lifetime.days <= 31

    # run again: the CA and the token stay, so a node added later joins the same cluster
    ca_pem, n0_pem = (out / "ca.pem").read_bytes(), (out / "n0.pem").read_bytes()
    again = gosgd_certs("--out", str(out), "--nodes", "n2")
    assert again.returncode == 0, again.stderr
    assert (out / "ca.pem").read_bytes() == ca_pem and (out / "n0.pem").read_bytes() == n0_pem
    assert (out / "token").read_text().strip() == token
    load(out / "n2.pem").verify_directly_issued_by(ca)

    # --new-ca replaces both
    renewed = gosgd_certs("--out", str(out), "--nodes", "n0", "--new-ca")
    assert renewed.returncode == 0, renewed.stderr
    assert (out / "ca.pem").read_bytes() != ca_pem
    assert (out / "token").read_text().strip() != token
    load(out / "n0.pem").verify_directly_issued_by(load(out / "ca.pem"))


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--nodes", "a/b"], "DNS label"),
        (["--nodes", " , "], "no node names"),
        (["--nodes", "ca"], "reserved"),
        (["--nodes", "n0,N0"], "repeat"),
        (["--nodes", "n0", "--days", "0"], "at least 1"),
        (["--nodes", "n0", "--days", "x"], "invalid int value"),
    ],
)
def test_gosgd_certs_bad_input_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    # in-process: the entry point is the same function the subprocess test above runs
    with pytest.raises(SystemExit) as info:
        certs.main(["--out", str(tmp_path / "certs"), *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "certs").exists()  # nothing written


def test_a_broken_ca_folder_is_a_one_line_error(tmp_path: Path) -> None:
    certs.write_cluster(tmp_path, ["n0"])
    (tmp_path / "ca.key").unlink()
    with pytest.raises(ValueError, match="only one of ca.pem and ca.key"):
        certs.write_cluster(tmp_path, ["n1"])
    other_key = certs.make_ca()[1]
    (tmp_path / "ca.key").write_bytes(certs.key_pem(other_key))
    with pytest.raises(ValueError, match="is not the key of"):
        certs.write_cluster(tmp_path, ["n1"])
    assert not (tmp_path / "n1.pem").exists()
    assert certs.write_cluster(tmp_path, ["n1"], new_ca=True)[0] == tmp_path / "ca.pem"
