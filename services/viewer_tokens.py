"""Viewer tokens: a signed, expiring permission to watch one job.

Signed with ``TOKENCAST_SECRET`` by ``itsdangerous`` (HMAC-SHA1 over the job
id and a timestamp); a token for one job does not open another.
"""

from __future__ import annotations

from enum import Enum

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

SALT = "tokencast.viewer"


class Verdict(Enum):
    VALID = "valid"
    EXPIRED = "expired"
    WRONG_JOB = "wrong_job"
    INVALID = "invalid"


class ViewerTokens:
    def __init__(self, secret: str, ttl_s: int):
        self._serializer = URLSafeTimedSerializer(secret, salt=SALT)
        self.ttl_s = ttl_s

    def issue(self, job_id: str) -> str:
        return self._serializer.dumps(job_id)

    def check(self, token: str, job_id: str) -> Verdict:
        try:
            signed_for = self._serializer.loads(token, max_age=int(self.ttl_s))
        except SignatureExpired:
            return Verdict.EXPIRED
        except BadSignature:
            return Verdict.INVALID
        return Verdict.VALID if signed_for == job_id else Verdict.WRONG_JOB
