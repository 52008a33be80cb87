"""The TLS URL options shared by rabbit:// and amqp:// (tidings.drivers._rabbitmq.tls):
declared once, checked once, the same names and meaning in both drivers, and the advice a failed
handshake gets. No broker: the drivers do not connect when they are built (tests/reliability
has the handshakes).
"""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest

import tidings
from tidings.drivers._rabbitmq.tls import TLS_OPTIONS, TLSSettings, tls_settings
from tidings.drivers.amqp1 import AMQP1Driver
from tidings.drivers.rabbit.options import OPTIONS as RABBIT_OPTIONS
from tidings.drivers.rabbit.options import Settings
from tidings.transports.errors import InvalidTransportOption
from tidings.transports.url import TransportURL

NAMES = ("ssl", "ssl_ca_file", "ssl_cert_file", "ssl_key_file", "ssl_verify_hostname")


def _settings(query: str = "", url: str = "amqp://u:secret@broker/") -> TLSSettings | None:
    parsed = TransportURL.parse(url + (f"?{query}" if query else ""))
    options: dict[str, Any] = {k: o.default for k, o in TLS_OPTIONS.items()}
    options.update({k: TLS_OPTIONS[k].convert(k, v) for k, v in parsed.query.items()})
    return tls_settings(parsed, options)


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate (also usable as a CA bundle) with its key, another key."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    d = tmp_path_factory.mktemp("pem")
    for name in ("cert", "other"):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                        f"{name}.key", "-out", f"{name}.pem", "-days", "1", "-subj",
                        f"/CN={name}"], cwd=d, check=True, capture_output=True, timeout=60)
    (d / "both.pem").write_text((d / "cert.pem").read_text() + (d / "cert.key").read_text())
    subprocess.run(["openssl", "rsa", "-in", "cert.key", "-aes256", "-passout", "pass:pw",
                    "-out", "encrypted.key"], cwd=d, check=True, capture_output=True, timeout=60)
    return d


def test_declared_once_with_the_same_names_in_both_drivers() -> None:
    assert tuple(TLS_OPTIONS) == NAMES
    for name in NAMES:
        assert RABBIT_OPTIONS[name] is TLS_OPTIONS[name]
        assert AMQP1Driver.options[name] is TLS_OPTIONS[name]
    assert TLS_OPTIONS["ssl"].default is False
    assert TLS_OPTIONS["ssl_verify_hostname"].default is True


def test_tls_is_off_by_default_and_verifies_the_host_name_when_on() -> None:
    assert _settings() is None
    assert _settings("ssl=false") is None
    assert _settings("ssl=true") == TLSSettings(verify_hostname=True)
    assert _settings("ssl=true&ssl_verify_hostname=false") == TLSSettings(verify_hostname=False)
    assert _settings("ssl=true&ssl_ca_file=/ca.pem&ssl_cert_file=/c.pem&ssl_key_file=/c.key") \
        == TLSSettings("/ca.pem", "/c.pem", "/c.key", True)


@pytest.mark.parametrize("query, named", [
    ("ssl_ca_file=/ca.pem", "ssl_ca_file"),
    ("ssl=false&ssl_cert_file=/c.pem&ssl_key_file=/c.key", "ssl_cert_file, ssl_key_file"),
])
def test_files_without_ssl_true_are_refused_naming_the_fix(query: str, named: str) -> None:
    with pytest.raises(InvalidTransportOption) as err:
        _settings(query)
    text = str(err.value)
    assert text.startswith(f"{named} given in") and text.endswith("add ssl=true to the URL")
    assert "secret" not in text and "u:****@broker" in text


def test_a_key_without_its_certificate_is_refused() -> None:
    with pytest.raises(InvalidTransportOption, match=r"ssl_key_file needs ssl_cert_file.*add "
                                                     r"ssl_cert_file to the URL"):
        _settings("ssl=true&ssl_key_file=/c.key")


def test_ssl_options_are_the_py_amqp_keywords() -> None:
    tls = TLSSettings("/ca.pem", "/c.pem", "/c.key", True)
    assert tls.ssl_options() == {"cert_reqs": ssl.CERT_REQUIRED, "ca_certs": "/ca.pem",
                                 "certfile": "/c.pem", "keyfile": "/c.key",
                                 "server_hostname": None}
    # py-amqp checks the name exactly when server_hostname is given
    assert TLSSettings(verify_hostname=False).ssl_options() == {"cert_reqs": ssl.CERT_REQUIRED}


@pytest.mark.parametrize("scheme", ["rabbit", "amqp"])
def test_both_drivers_refuse_the_same_way_and_default_to_port_5671(scheme: str) -> None:
    with pytest.raises(InvalidTransportOption, match=r"^ssl_ca_file given in .*add ssl=true"):
        tidings.get_notification_transport(f"{scheme}://u:secret@h/?ssl_ca_file=/ca.pem")
    with pytest.raises(InvalidTransportOption, match="ssl_key_file needs ssl_cert_file"):
        tidings.get_notification_transport(f"{scheme}://h/?ssl=true&ssl_key_file=/k")
    for query, port in (("", 5672), ("?ssl=true&ssl_verify_hostname=false", 5671)):
        t = tidings.get_notification_transport(f"{scheme}://h/{query}")
        try:
            driver: Any = t._driver  # type: ignore[attr-defined]
            hosts = (driver._params.hosts if scheme == "amqp"
                     else driver.settings.endpoints)
            assert hosts[0].port == port
        finally:
            t.cleanup()


def test_rabbit_settings_keep_their_kombu_form() -> None:
    url = TransportURL.parse("rabbit://h/?ssl=true&ssl_ca_file=/ca.pem")
    options = {k: o.default for k, o in RABBIT_OPTIONS.items()}
    options.update(ssl=True, ssl_ca_file="/ca.pem")
    s = Settings.from_url(url, options)
    assert s.tls == TLSSettings(ca_file="/ca.pem")
    assert s.ssl_options == {"cert_reqs": ssl.CERT_REQUIRED, "ca_certs": "/ca.pem",
                             "server_hostname": None}
    options.update(ssl=False, ssl_ca_file="")
    assert Settings.from_url(url, options).ssl_options is None


def test_check_files_accepts_good_files(pem: Path) -> None:
    TLSSettings(str(pem / "cert.pem"), str(pem / "cert.pem"), str(pem / "cert.key")).check_files()
    TLSSettings(cert_file=str(pem / "both.pem")).check_files()  # the key in the same file
    TLSSettings().check_files()  # the system's CAs


@pytest.mark.parametrize("files, message", [
    ({"ca_file": "/nonexistent/ca.pem"}, "ssl_ca_file=/nonexistent/ca.pem cannot be used: No "
                                         "such file"),
    ({"ca_file": "{pem}/cert.key"}, "ssl_ca_file=.*cert.key cannot be used: .*no certificate"),
    ({"cert_file": "{pem}/cert.pem", "key_file": "{pem}/other.key"},
     "ssl_cert_file=.*cert.pem with ssl_key_file=.*other.key cannot be used: .*mismatch"),
    ({"cert_file": "{pem}/cert.pem"}, "no ssl_key_file: the key is looked for in the same file"),
    ({"cert_file": "{pem}/cert.pem", "key_file": "{pem}/encrypted.key"},
     "encrypted with a passphrase"),
])
def test_check_files_names_the_option_and_the_problem(
        pem: Path, files: dict[str, str], message: str) -> None:
    tls = TLSSettings(**{k: v.format(pem=pem) for k, v in files.items()})
    with pytest.raises(InvalidTransportOption, match=message):
        tls.check_files()


def test_the_amqp_driver_checks_the_files_when_it_is_built(pem: Path) -> None:
    with pytest.raises(InvalidTransportOption, match=r"ssl_ca_file=/nonexistent\.pem"):
        tidings.get_notification_transport("amqp://h/?ssl=true&ssl_ca_file=/nonexistent.pem")
    t = tidings.get_notification_transport(
        f"amqp://h/?ssl=true&ssl_ca_file={pem / 'cert.pem'}&ssl_cert_file={pem / 'cert.pem'}"
        f"&ssl_key_file={pem / 'cert.key'}")
    t.cleanup()


@pytest.mark.parametrize("error, advice", [
    ("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: IP address mismatch, "
     "certificate is not valid for '127.0.0.1'.",
     "does not name '127.0.0.1', the host in the URL.*ssl_verify_hostname=false"),
    ("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate in "
     "certificate chain", "check that ssl_ca_file=/ca.pem holds the CA that signed"),
    ("certificate verify failed",  # proton: no detail, so both checks
     "ssl_ca_file=/ca.pem holds the CA.*names '127.0.0.1'.*ssl_verify_hostname=false"),
    ("[SSL: WRONG_VERSION_NUMBER] wrong version number", "is the broker's TLS listener"),
    ("tlsv13 alert certificate required", "requires a client certificate: add ssl_cert_file"),
    ("EOF occurred in violation of protocol", "hung up.*add ssl_cert_file and ssl_key_file"),
    ("certificate has expired", "dates"),
])
def test_a_failed_handshake_names_tls_and_what_to_check(error: str, advice: str) -> None:
    text = TLSSettings(ca_file="/ca.pem").explain_handshake_failure("127.0.0.1:5671",
                                                                    "127.0.0.1", error)
    assert text.startswith(f"TLS handshake with 127.0.0.1:5671 failed ({error})")
    assert re.search(advice, text), text


def test_advice_follows_the_settings() -> None:
    text = TLSSettings(verify_hostname=False).explain_handshake_failure(
        "b:5671", "b", "certificate verify failed")
    assert "the system's CA certificates (no ssl_ca_file given)" in text
    assert "ssl_verify_hostname" not in text  # the name was not checked
    text = TLSSettings(cert_file="/c.pem").explain_handshake_failure(
        "b:5671", "b", "sslv3 alert bad certificate")
    assert "refused the client certificate ssl_cert_file=/c.pem" in text
