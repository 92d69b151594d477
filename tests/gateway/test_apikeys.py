"""API key store: digests only, plain-key files still load, short keys refused, `cme keys add`."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from services import cli
from services.gateway.apikeys import KeyStore, add_key, key_digest, load_api_keys

LONG = "plain-key-0123456789abcdef"  # 26 characters


def test_digest_is_sha256_of_the_utf8_key() -> None:
    assert key_digest("abc") == "sha256:" + hashlib.sha256(b"abc").hexdigest()


def test_plain_and_digest_entries_name_accounts() -> None:
    store = KeyStore({LONG: "alice", key_digest("x" * 40): "bob"})
    assert store.account_for(LONG) == "alice"
    assert store.account_for("x" * 40) == "bob"
    assert store.account_for(key_digest("x" * 40)) is None  # the digest is not a key
    assert store.account_for(LONG + "!") is None
    assert store.account_for(None) is None and store.account_for(5) is None


def test_presented_keys_outside_the_length_bounds_are_not_hashed() -> None:
    store = KeyStore({"y" * 256: "alice"})
    assert store.account_for("y" * 256) == "alice"
    assert store.account_for("y" * 257) is None
    assert store.account_for("y" * 21) is None


def test_a_lone_surrogate_key_never_raises() -> None:
    assert KeyStore({LONG: "alice"}).account_for("\ud800" * 30) is None


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"short-key": "alice"}, "22"),
        ({"sha256:abc": "alice"}, "malformed digest"),
        ({"sha256:" + "A" * 64: "alice"}, "malformed digest"),  # lowercase hex only
        ({LONG: "al ice"}, "invalid account"),
        ({LONG: "alice", key_digest(LONG): "bob"}, "two accounts"),
    ],
)
def test_unusable_entries_are_refused(entries: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KeyStore(entries)


def test_error_messages_never_show_a_key() -> None:
    with pytest.raises(ValueError) as info:
        KeyStore({"tooshort-s3cret": "alice"})
    assert "s3cret" not in str(info.value)


def test_add_key_stores_only_the_digest_in_a_0600_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key = add_key(str(path), "alice")
    assert len(key) >= 43  # 32 random bytes
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert key not in text
    assert json.loads(text) == {key_digest(key): "alice"}
    assert load_api_keys(str(path)).account_for(key) == "alice"


def test_add_key_keeps_existing_entries(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({LONG: "bob"}))
    os.chmod(path, 0o644)
    key = add_key(str(path), "alice")
    store = load_api_keys(str(path))
    assert store.account_for(key) == "alice" and store.account_for(LONG) == "bob"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["keys.json"]  # no temporary file left behind


def test_add_key_refuses_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"short": "bob"}))
    with pytest.raises(ValueError):
        add_key(str(path), "alice")
    assert json.loads(path.read_text()) == {"short": "bob"}
    with pytest.raises(ValueError):
        add_key(str(tmp_path / "new.json"), "not an account")
    assert not (tmp_path / "new.json").exists()


def test_cme_keys_add_prints_the_key_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "keys.json"
    assert cli.main(["keys", "add", "alice", "--api-keys", str(path)]) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert load_api_keys(str(path)).account_for(key) == "alice"
    assert key not in err and key not in path.read_text()
    assert cli.main(["keys", "add", "bad name", "--api-keys", str(path)]) == 2
    assert "invalid account" in capsys.readouterr().err
