"""Who is asking: the tenant behind a request's API key (a FastAPI dependency of every tenant route)."""

from __future__ import annotations

from fastapi import Request

from safekeel.service.protocol import APIError
from safekeel.service.settings import Tenant


def current_tenant(request: Request) -> Tenant:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'", "missing_api_key", type="authentication_error")
    tenant = request.app.state.tenants.get(key.strip())
    if tenant is None:
        raise APIError(401, "Incorrect API key provided", "invalid_api_key", type="authentication_error")
    return tenant
