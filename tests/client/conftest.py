"""The e2e stack fixtures (a real redis-server, matcher, gateway and feeds as processes) for the
client library's tests."""

from tests.e2e.conftest import shared_stack

__all__ = ["shared_stack"]
