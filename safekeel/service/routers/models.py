"""/v1/models: base models (served or fine-tunable) and the caller's fine-tuned models, with `parent`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from openai.types import ModelDeleted

from safekeel.service.auth import current_tenant
from safekeel.service.protocol import ERRORS, APIError, ModelList, ServedModel, error_responses, model_object, not_found
from safekeel.service.settings import Tenant

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERRORS)
STARTED = 1764115200  # a fixed 'created' for base models (they are not created by this service)


def _all(request: Request, tenant: Tenant) -> list[dict]:
    settings, store = request.app.state.settings, request.app.state.store
    served = settings.base_models[0]
    models = [model_object(name, "safekeel", STARTED, None, served=name == served) for name in settings.base_models]
    for record in store.list_models(None if tenant.admin else tenant.name):
        models.append(model_object(record["id"], record["tenant"], record["created_at"], record["parent"],
                                   served=record["parent"] == served, fine_tuning_job=record["job_id"],
                                   guard={k: record["guard"].get(k) for k in ("demonstrations", "n_demonstrations")}
                                   | {"system_prompt": bool(record["guard"].get("system_prompt"))}
                                   | ({"cluster_set": record["guard"]["cluster_set"]} if record["guard"].get("cluster_set") else {})))
    return models


@router.get("", response_model=ModelList, response_model_exclude_unset=True)
async def list_models(request: Request, tenant: Tenant = Depends(current_tenant)):
    return {"object": "list", "data": _all(request, tenant)}


@router.get("/{model_id:path}", response_model=ServedModel, response_model_exclude_unset=True)
async def retrieve_model(request: Request, model_id: str, tenant: Tenant = Depends(current_tenant)):
    for model in _all(request, tenant):
        if model["id"] == model_id:
            return model
    raise not_found("model", model_id, "model")


@router.delete("/{model_id:path}", response_model=ModelDeleted, response_model_exclude_unset=True,
                responses=error_responses(403))
async def delete_model(request: Request, model_id: str, tenant: Tenant = Depends(current_tenant)):
    store = request.app.state.store
    record = store.get_model(model_id, None if tenant.admin else tenant.name)
    if record is None:
        if model_id in request.app.state.settings.base_models:
            raise APIError(403, f"Base model {model_id!r} cannot be deleted", "model_not_deletable", "model")
        raise not_found("model", model_id, "model")
    store.delete_model(model_id)
    return {"id": model_id, "object": "model", "deleted": True}
