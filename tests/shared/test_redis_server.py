"""The embedded redis-server's persistence settings, read back from the running server."""

from __future__ import annotations

import redis

from shared.redis_server import RedisServer


def test_aof_everysec_and_rarely_rewritten(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        config = client.config_get("*")
    finally:
        client.close()
    assert config["appendonly"] == "yes"
    assert config["appendfsync"] == "everysec"
    assert config["save"] == ""
    # Redis's default (64mb) rewrote the AOF seconds into a loaded run; each rewrite forks.
    assert config["auto-aof-rewrite-min-size"] == str(512 * 1024 * 1024)
