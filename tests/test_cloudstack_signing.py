"""Java-exact CloudStack signing: the reference vectors and the characters clients get wrong."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from oma.plugins.ossea.signing import (
    canonical_string,
    java_urlencode,
    sign,
    signed_query,
    verify,
)

KEY = "plgWJfZK4gyS3mOMTVmjUVg-X-jlWlnfaUJ9GAbBbf9EdM-kAYMmAiLqzzq1ElZLYq_u38zCm0bewzGUdP66mg"
SECRET = "VDaACYb0LV9eNjTetIOElcVQkvJck_J_QljX_FcHRj87ZKiy0z0ty0ZsYBkoXkY9b7eq1EhwJaw7FF3akA3KBQ"
NOW = datetime(2029, 6, 1, tzinfo=UTC)


def test_tv1_developers_guide() -> None:
    params = {"apikey": KEY, "command": "listUsers", "response": "json"}
    assert sign(params, SECRET) == "TTpdDq/7j/J58XCRHomKoQXEQds="


def test_tv2_create_volume_with_awkward_name_and_v3() -> None:
    params = {"command": "createVolume", "response": "json", "apiKey": KEY,
              "name": "migr disk~1 [scsi0:1]*+é", "zoneid": "a1b2c3d4-0000-4000-8000-000000000001",
              "diskofferingid": "d0000000-0000-4000-8000-00000000000c", "size": "40",
              "signatureVersion": "3", "expires": "2030-01-01T00:00:00+0000"}
    assert sign(params, SECRET) == "ZzthS/Nr21z8/2YOXVtPQ/MdyDU="


def test_tv3_raw_name_sort_is_case_sensitive() -> None:
    params = {"command": "listTemplates", "templatefilter": "executable", "templateId": "x",
              "apiKey": KEY, "response": "json"}
    assert sign(params, SECRET) == "p/jP4Gf6l1UJRC3HVfPelX6jjZ8="
    assert canonical_string(params).index("templateid=x") < canonical_string(params).index("templatefilter=")


@pytest.mark.parametrize(("value", "encoded"), [
    ("a~b", "a%7Eb"), ("[scsi0:1]", "%5Bscsi0%3A1%5D"), ("a b+c", "a%20b%2Bc"),
    ("*.-_", "*.-_"), ("é", "%C3%A9"), ("日本", "%E6%97%A5%E6%9C%AC"), ("a/b=c&d", "a%2Fb%3Dc%26d"),
])
def test_value_encoding_matches_java_urlencoder(value: str, encoded: str) -> None:
    assert java_urlencode(value) == encoded


def test_signature_excluded_and_whole_string_lowercased() -> None:
    params = {"command": "listZones", "Name": "Zone~A", "signature": "ignored"}
    # "Name" sorts before "command": uppercase first, as Java's String.compareTo.
    assert canonical_string(params) == "name=zone%7ea&command=listzones"
    assert sign(params, SECRET) == sign({k: v for k, v in params.items() if k != "signature"}, SECRET)


def test_signed_query_roundtrip_and_v3_fields() -> None:
    query = signed_query({"command": "listZones"}, KEY, SECRET, datetime(2030, 1, 1, tzinfo=UTC))
    assert query["apiKey"] == KEY and query["response"] == "json"
    assert query["signatureVersion"] == "3" and query["expires"] == "2030-01-01T00:00:00+0000"
    assert verify(query, SECRET, NOW)


def test_verify_rejects_wrong_secret_tampering_and_expiry() -> None:
    query = signed_query({"command": "createVolume", "name": "disk [1]~é"}, KEY, SECRET,
                         NOW + timedelta(minutes=5))
    assert verify(query, SECRET, NOW)
    assert not verify(query, SECRET + "x", NOW)
    assert not verify({**query, "name": "disk [2]~é"}, SECRET, NOW)
    assert not verify(query, SECRET, NOW + timedelta(minutes=6))
    assert not verify({k: v for k, v in query.items() if k != "expires"}, SECRET, NOW)
    assert not verify(query, SECRET, NOW, max_ahead=timedelta(minutes=1))


def test_verify_finds_special_names_case_insensitively() -> None:
    query = signed_query({"command": "listZones"}, KEY, SECRET, NOW + timedelta(minutes=5))
    renamed = {("SIGNATUREVERSION" if k == "signatureVersion" else k): v for k, v in query.items()}
    renamed.pop("signature")
    renamed["Signature"] = sign(renamed, SECRET)
    assert verify(renamed, SECRET, NOW)
    expired = {**renamed, "Signature": ""}
    assert not verify(expired, SECRET, NOW)
