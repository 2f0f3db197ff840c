"""The plane CA issues certificates that real TLS clients accept for every advertised name."""

import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509

from noports.keys import ca


def _serve_once(ctx: ssl.SSLContext, sock: socket.socket) -> None:
    conn, _ = sock.accept()
    try:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(b"@")
    except (ssl.SSLError, OSError):
        pass


@pytest.mark.parametrize("dial", ["localhost", "127.0.0.1"])
def test_certificate_verifies_for_each_name(tmp_path, dial):
    files = ca.ensure_plane_tls(tmp_path, ["127.0.0.1", "localhost"])
    assert stat.S_IMODE(files.ca_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    srv = socket.create_server(("127.0.0.1", 0))
    t = threading.Thread(target=_serve_once, args=(ca.server_context(files), srv), daemon=True)
    t.start()
    with socket.create_connection(("127.0.0.1", srv.getsockname()[1])) as raw, \
            ca.client_context(files.ca_cert).wrap_socket(raw, server_hostname=dial) as tls:
        assert tls.recv(1) == b"@"
    t.join(5)
    srv.close()


def test_untrusted_name_is_refused(tmp_path):
    files = ca.ensure_plane_tls(tmp_path, ["127.0.0.1"])
    srv = socket.create_server(("127.0.0.1", 0))
    t = threading.Thread(target=_serve_once, args=(ca.server_context(files), srv), daemon=True)
    t.start()
    with socket.create_connection(("127.0.0.1", srv.getsockname()[1])) as raw, \
            pytest.raises(ssl.SSLCertVerificationError):
        ca.client_context(files.ca_cert).wrap_socket(raw, server_hostname="evil.example")
    t.join(5)
    srv.close()


def test_ensure_is_idempotent_and_reissues_for_new_names(tmp_path):
    first = ca.ensure_plane_tls(tmp_path, ["127.0.0.1"])
    ca_pem, leaf = first.ca_cert.read_bytes(), first.cert.read_bytes()
    assert ca.ensure_plane_tls(tmp_path, ["127.0.0.1"]).cert.read_bytes() == leaf
    again = ca.ensure_plane_tls(tmp_path, ["127.0.0.1", "relay.test"])
    assert again.ca_cert.read_bytes() == ca_pem  # CA kept: clients keep trusting it
    cert = x509.load_pem_x509_certificate(again.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "relay.test" in san.get_values_for_type(x509.DNSName)
