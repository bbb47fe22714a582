"""Where the bank's bearer token is read: one reader for `instdisc bank serve
--token-file`, the Ray shard actors and the train workers. No Ray and nothing heavy
here: the bank's own CLI imports it."""

from __future__ import annotations

import os
from pathlib import Path


class BankTokenMissing(RuntimeError):
    """The token's file or environment variable is missing or empty where it is read."""


def read_token(token_file: str | None = None, token_env: str | None = None) -> str | None:
    """The bank's bearer token from `token_file` or the environment variable named
    `token_env` (None when neither is given); BankTokenMissing naming the source if it
    is missing or empty, rather than a bank open to anyone."""
    if token_file and token_env:
        raise ValueError("give the token's file or its environment variable, not both")
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as error:
            raise BankTokenMissing(f"cannot read the bank token file {token_file}: {error}") from None
        if not token:
            raise BankTokenMissing(f"the bank token file {token_file} is empty")
        return token
    if token_env:
        token = os.environ.get(token_env, "").strip()
        if not token:
            raise BankTokenMissing(
                f"the environment variable {token_env} (the bank token) is unset or empty in this process"
            )
        return token
    return None
