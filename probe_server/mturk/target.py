"""Which MTurk a command talks to, without loading the AWS SDK.

Kept apart from :mod:`probe_server.mturk.requester` so the command line can
parse its arguments (and ``probe-server serve`` can start) without importing
aioboto3.
"""

from __future__ import annotations

from dataclasses import dataclass

REGION = "us-east-1"  # MTurk's only region
LIVE_ENDPOINT = "https://mturk-requester.us-east-1.amazonaws.com"
SANDBOX_ENDPOINT = "https://mturk-requester-sandbox.us-east-1.amazonaws.com"


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
        return self.endpoint_url or (LIVE_ENDPOINT if self.live else SANDBOX_ENDPOINT)

    @property
    def label(self) -> str:
        return "LIVE MTurk" if self.live else "MTurk sandbox"
