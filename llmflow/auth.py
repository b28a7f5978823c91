"""The one place the model server's ``Authorization`` header is built from its API key."""

from __future__ import annotations


def bearer(api_key: str | None) -> dict[str, str]:
    """``{"Authorization": "Bearer <key>"}``, or no header for a server that takes no key."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}
