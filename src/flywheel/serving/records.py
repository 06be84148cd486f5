"""Record ids that only this deployment can mint, so that only a caller who got a prediction can
label it.

A record id is `<request id>.<tag>-<n>`: the tag is an HMAC-SHA256 of the request id (80 bits)
under a key kept in the state database (`server_keys`), shared by every worker and replica on
that database and stable across restarts. `/v1/feedback` checks the tag with no database read;
ids it did not issue are refused unless `serving.accept_unsigned_feedback` is set.
"""

from __future__ import annotations

import hmac

import sqlalchemy as sa

from flywheel.state.db import server_key

KEY_NAME = "record_ids"


class RecordIds:
    def __init__(self, key: bytes):
        self.key = key

    @classmethod
    def from_state(cls, engine: sa.Engine) -> RecordIds:
        return cls(server_key(engine, KEY_NAME))

    def tag(self, request_id: str) -> str:
        return hmac.digest(self.key, request_id.encode(), "sha256")[:10].hex()

    def mint(self, request_id: str, count: int) -> list[str]:
        base = f"{request_id}.{self.tag(request_id)}"
        return [f"{base}-{i}" for i in range(count)]

    def issued(self, record_id: str) -> bool:
        """Whether this deployment minted `record_id` (constant-time in the tag)."""
        base, dash, number = record_id.rpartition("-")
        request_id, dot, tag = base.rpartition(".")
        if not (dash and dot and number.isdigit() and request_id):
            return False
        return hmac.compare_digest(tag, self.tag(request_id))
