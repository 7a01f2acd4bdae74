"""The Hugging Face hub, for model and dataset ids: fail in seconds, naming the setting, when it cannot be
reached, rather than after a minute of the hub client's retries."""

import os
import socket
from urllib.parse import urlparse

PROBE_SECONDS = 3.0
"""How long to wait for the hub's server to accept a connection."""


def endpoint() -> str:
    """The hub's address: `$HF_ENDPOINT`, as the hub client reads it, else huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline() -> bool:
    """Whether the user asked for the local cache only (`HF_HUB_OFFLINE=1`)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def unreachable() -> str | None:
    """Why the hub cannot be reached (a name that does not resolve, a refused or timed-out connection), or
    None when its server accepts a connection."""
    url = urlparse(endpoint())
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
    except OSError as err:
        return f"{endpoint()}: {err.strerror or err}"
    return None


def error(key: str, value: str, why: str, local: str) -> ConnectionError:
    """The error for hub id `value` of setting `key` when the hub is out of reach (`why`): the setting, and
    what would work offline (`local`)."""
    return ConnectionError(
        f"{key}={value!r} is a hub id, but the hub cannot be reached ({why}); {local}, or set HF_HUB_OFFLINE=1 "
        "to use only what is in the local Hugging Face cache"
    )
