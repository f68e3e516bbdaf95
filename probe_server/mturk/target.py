"""Which MTurk a command talks to, without loading the AWS SDK.

Kept apart from :mod:`probe_server.mturk.requester` so the command line can
parse its arguments (and ``probe-server serve`` can start) without importing
aioboto3.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

REGION = "us-east-1"  # MTurk's only region
LIVE_ENDPOINT = "https://mturk-requester.us-east-1.amazonaws.com"
SANDBOX_ENDPOINT = "https://mturk-requester-sandbox.us-east-1.amazonaws.com"


def configured_endpoint() -> str | None:
    """An endpoint set with AWS's standard variables, if any.

    botocore honours ``AWS_ENDPOINT_URL_MTURK`` and ``AWS_ENDPOINT_URL`` for
    production; they apply to the sandbox here too, so one variable sends
    every command (and every test) to a fake.
    """
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return None
    return os.environ.get("AWS_ENDPOINT_URL_MTURK") or os.environ.get("AWS_ENDPOINT_URL") or None


class RequesterError(Exception):
    """A workflow step cannot go on; the message is one line for the researcher."""


@dataclass(frozen=True, slots=True)
class Target:
    """Which MTurk: the sandbox unless ``live``; ``endpoint_url`` for a fake."""

    live: bool = False
    endpoint_url: str | None = None
    profile: str | None = None

    @property
    def sandbox(self) -> bool:
        return not self.live

    @property
    def url(self) -> str:
        """``endpoint_url``, else the configured endpoint, else MTurk's own."""
        default = LIVE_ENDPOINT if self.live else SANDBOX_ENDPOINT
        return self.endpoint_url or configured_endpoint() or default

    @property
    def custom(self) -> bool:
        """Not one of MTurk's own endpoints (a fake, or a test's)."""
        return self.url not in (LIVE_ENDPOINT, SANDBOX_ENDPOINT)

    @property
    def label(self) -> str:
        return "LIVE MTurk" if self.live else "MTurk sandbox"
