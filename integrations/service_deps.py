"""What every route of the service shares: the authenticated tenant, parameter types, documented errors,
and text checks. Module level, because FastAPI resolves route annotations in their module's namespace."""
from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, HTTPException, Path, Request, Security
from fastapi.security import APIKeyHeader, HTTPBearer

from ragkv.integrations.service_http import TENANT_SCOPE_KEY
from ragkv.integrations.service_models import ErrorBody
from ragkv.integrations.tenants import Tenant
from ragkv.kvstore import ConfigError, check_key

KEY_DOC = "Store key '<namespace>:<name>' (both parts of [A-Za-z0-9._-]); your namespace or 'shared'"


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {401: "Missing or invalid API key", 403: "Namespace not accessible with this API key",
            404: "Chunk not found", 413: "Request body too large, or over the tenant's quota", 415: "Wrong content type",
            422: "Malformed key, body or parameters", 429: "Model busy: too many requests waiting"}
    return {c: {"model": ErrorBody, "description": text[c]} for c in codes}


_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: <API key>")


async def authenticated_tenant(request: Request, _bearer_credentials: Annotated[Any, Security(_bearer)] = None,
                  _key: Annotated[Any, Security(_api_key)] = None) -> Tenant:
    """The tenant ``GuardMiddleware`` authenticated (the Security parameters only document the schemes).
    Async on purpose: FastAPI runs sync dependencies in a worker thread, a hop per request for nothing."""
    tenant = request.scope.get(TENANT_SCOPE_KEY)
    if tenant is None:
        raise HTTPException(401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})
    return tenant


# Parameter types of the routes (module level: annotations are resolved in the module's namespace).
KeyParam = Annotated[str, Path(description=KEY_DOC, max_length=200)]
TenantDep = Annotated[Tenant, Depends(authenticated_tenant)]


def check_text(text: str, what: str, limit: int) -> str:
    if len(text) > limit:
        raise ConfigError(f"{what} has {len(text)} characters; the limit is {limit}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(f"{what} is not valid Unicode text") from exc
    return text


def printable(text: str) -> str:
    """``text`` as valid UTF-8 (lone surrogates escaped), so an error message can always be sent."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def checked_key(key: str) -> str:
    try:
        return check_key(key)
    except ConfigError as exc:
        raise HTTPException(422, str(exc)) from exc


__all__ = ["KEY_DOC", "KeyParam", "TenantDep", "check_text", "checked_key", "error_responses", "printable"]
