"""The NBD target the VMA is told to write: the export's own URI (TLS included), its host replaced by
OMA_NBD_HOST when set (services/replication/driver.py device_uri)."""
from __future__ import annotations

from oma.services.replication.driver import device_uri
from oma.services.replication.models import JobVolume

TLS_URI = "nbds://oma@127.0.0.1:10809/migration-vm-disk0?tls-psk-file=/etc/vma/nbd-tls.psk"


def row(uri: str | None) -> JobVolume:
    return JobVolume(export_uri=uri, export_port=10809, export_name="migration-vm-disk0")


def test_tls_target_keeps_scheme_user_and_key_when_the_host_is_replaced():
    assert device_uri(row(TLS_URI), "oma.example") == \
        "nbds://oma@oma.example:10809/migration-vm-disk0?tls-psk-file=/etc/vma/nbd-tls.psk"
    assert device_uri(row(TLS_URI), "") == TLS_URI


def test_plain_targets():
    assert device_uri(row("nbd://127.0.0.1:10809/migration-vm-disk0"), "oma-nbd.lan") == \
        "nbd://oma-nbd.lan:10809/migration-vm-disk0"
    assert device_uri(row("nbd://127.0.0.1:10809/migration-vm-disk0"), "") == \
        "nbd://127.0.0.1:10809/migration-vm-disk0"
    assert device_uri(row(None), "") == "nbd://:10809/migration-vm-disk0"
    assert device_uri(row(None), "oma") == "nbd://oma:10809/migration-vm-disk0"
