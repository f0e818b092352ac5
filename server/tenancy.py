"""Who a request belongs to: its prefix-cache namespace and where its sessions live.

Owns the isolation rules. A request's cached states are shared only with requests of the same
namespace: its `cache_salt` (vLLM's field) and, when API keys are configured and the operator has
not opted into `--share-prefix-cache`, its key's tenant. Sessions are files under the session
directory, one folder per tenant when keys are configured; the admin key may name any tenant's
session as `TENANT/NAME`. Knows the request's scope state (set by `server.auth`), nothing of the
engine's internals.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import Request

from megalodon_infer.core.sessions import validate_name
from server.settings import ServerSettings


def tenant(request: Request) -> str:
    """The API key's tenant, or "" on a server without keys."""
    return getattr(request.state, "tenant", "")


def cache_salt(request: Request, settings: ServerSettings, salt: str | None) -> str | None:
    """The prefix-cache namespace of a request: its tenant (unless shared) and its own salt."""
    owner = "" if settings.share_prefix_cache else tenant(request)
    if not owner and not salt:
        return None
    return f"{owner}/{salt or ''}"


def session_location(request: Request, settings: ServerSettings, directory: Path, name: str
                     ) -> tuple[Path, str, str]:
    """(folder, file name, owning tenant) of session `name` for this request's key.

    A key's sessions live in a folder of its own; only the admin key may reach another tenant's,
    by naming it `TENANT/NAME` (for any other key such a name is just invalid). Raises SessionError
    for a bad name.
    """
    owner = tenant(request)
    if "/" in name and getattr(request.state, "is_admin", False):
        owner, _, name = name.partition("/")
        validate_name(owner)
    validate_name(name)
    return (directory / "tenants" / owner if owner else directory), name, owner
