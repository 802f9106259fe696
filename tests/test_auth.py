"""Unit tests for mesh/auth.py: API keys, how requests carry them, and OpenAI-shaped errors."""

from __future__ import annotations

import hashlib
import json
import re
import time

import msgpack
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from gpumesh.mesh.auth import ADMIN, USER, hash_key, key_from_request, new_api_key

KEY_RE = re.compile(r"^gm-([0-9a-f]{8})-([A-Za-z0-9_-]{43})$")


# --- keys ----------------------------------------------------------------------------------

def test_key_format():
    key, record = new_api_key("ops", ADMIN)
    match = KEY_RE.match(key)
    assert match, key
    assert match.group(1) == record["id"]          # the id inside the key names the record


def test_record_fields():
    before = time.time()
    key, record = new_api_key("ci-bot", USER)
    assert set(record) == {"id", "hash", "name", "role", "created"}
    assert record["name"] == "ci-bot"
    assert record["role"] == "user"
    assert before <= record["created"] <= time.time()


def test_roles():
    assert (ADMIN, USER) == ("admin", "user")


def test_hash_is_sha256_of_the_whole_key():
    key, record = new_api_key("ops", ADMIN)
    assert record["hash"] == hashlib.sha256(key.encode()).hexdigest()
    assert record["hash"] == hash_key(key)
    assert re.fullmatch(r"[0-9a-f]{64}", record["hash"])


def test_hash_key_known_value():
    assert hash_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_record_never_contains_the_key_or_its_secret():
    key, record = new_api_key("ops", ADMIN)
    secret = key.split("-", 2)[2]
    blob = json.dumps(record)
    assert key not in blob
    assert secret not in blob


def test_keys_are_unique():
    keys = [new_api_key("k", USER) for _ in range(50)]
    assert len({k for k, _ in keys}) == 50
    assert len({r["hash"] for _, r in keys}) == 50


def test_record_is_plain_data():
    _, record = new_api_key("ops", ADMIN)
    assert msgpack.unpackb(msgpack.packb(record, use_bin_type=True), raw=False) == record


# --- key_from_request ----------------------------------------------------------------------

def _request(headers: dict[str, str]) -> web.Request:
    return make_mocked_request("GET", "/v1/models", headers=headers)


def test_bearer_token():
    assert key_from_request(_request({"Authorization": "Bearer gm-abc-xyz"})) == "gm-abc-xyz"


def test_bearer_scheme_is_case_insensitive_and_token_is_stripped():
    assert key_from_request(_request({"Authorization": "bearer   gm-abc-xyz  "})) == "gm-abc-xyz"
    assert key_from_request(_request({"Authorization": "BEARER gm-1"})) == "gm-1"


def test_x_api_key_header():
    assert key_from_request(_request({"X-API-Key": "gm-abc-xyz"})) == "gm-abc-xyz"


def test_header_names_are_case_insensitive():
    assert key_from_request(_request({"x-api-key": "k1"})) == "k1"
    assert key_from_request(_request({"authorization": "Bearer k2"})) == "k2"


def test_bearer_wins_over_x_api_key():
    request = _request({"Authorization": "Bearer from-bearer", "X-API-Key": "from-header"})
    assert key_from_request(request) == "from-bearer"


def test_no_credentials():
    assert key_from_request(_request({})) is None


@pytest.mark.parametrize("authorization", ["Bearer", "Bearer ", "Bearer    ", "Basic dXNlcjpwYXNz",
                                           "Token gm-1", "gm-1"])
def test_unusable_authorization_falls_back_to_x_api_key(authorization):
    assert key_from_request(_request({"Authorization": authorization})) is None
    assert key_from_request(_request({"Authorization": authorization,
                                      "X-API-Key": "k"})) == "k"


def test_empty_x_api_key_is_none():
    assert key_from_request(_request({"X-API-Key": ""})) is None
