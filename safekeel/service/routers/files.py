"""/v1/files: upload (validated, size-limited, content-addressed), list, retrieve, content, delete."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import get_args

from fastapi import APIRouter, Depends, Form, Request, UploadFile
from fastapi.responses import FileResponse
from openai.types import FileDeleted

from safekeel.data.formats import DatasetError, load_conversations
from safekeel.data.preference import is_preference_file, load_preferences
from safekeel.data.safety import is_pool_file, read_pool_file
from safekeel.service.auth import current_tenant
from safekeel.service.jobs import blob_path
from safekeel.service.protocol import ERRORS, APIError, File, FileList, FilePurpose, error_responses, file_object, not_found
from safekeel.service.settings import Tenant
from safekeel.service.store import new_id, now

router = APIRouter(prefix="/v1/files", tags=["files"], responses=ERRORS)
PURPOSES = get_args(FilePurpose)
SAFE_NAME = re.compile(r"^[^/\\\x00-\x1f]{1,255}$")
CHUNK = 1 << 20


POOL_FORMAT = "safety_pool"
"""The format recorded for a fine-tune upload in safekeel's pool schema: a custom pool for `safety.pool`."""


def validate_upload(path: Path, purpose: str) -> tuple[str, int]:
    """(format, number of examples) of an uploaded file; a DatasetError naming the line otherwise. A `fine-tune`
    file in safekeel's pool schema ({id, request, refusal[, category, style]} a line) is a safety pool, read by
    the loader `load_pool` uses; one in a preference format (OpenAI's preference JSONL, prompt/chosen/rejected) holds
    the pairs of a dpo job; any other is a dataset (chat, prompt/completion, Alpaca, question/answer)."""
    if purpose == "fine-tune" and is_pool_file(path):
        return POOL_FORMAT, len(read_pool_file(path))
    if purpose == "fine-tune" and is_preference_file(path):
        found = load_preferences(path, strict=True)
        return found.format, len(found.pairs)
    loaded = load_conversations(path, strict=True, require_assistant=purpose == "fine-tune")
    return loaded.format, len(loaded.conversations)


def check_filename(name: str | None) -> str:
    name = (name or "").strip()
    if not name or not SAFE_NAME.match(name) or name in (".", "..") or ".." in name.split("."):
        raise APIError(400, f"Invalid file name {name!r}: use a plain name without path separators, '..' or control characters",
                       "invalid_file_name", "file")
    return name


@router.post("", response_model=File, response_model_exclude_unset=True, responses=error_responses(413))
async def upload_file(request: Request, file: UploadFile, purpose: str = Form(""), tenant: Tenant = Depends(current_tenant)):
    settings, store = request.app.state.settings, request.app.state.store
    if purpose not in PURPOSES:
        raise APIError(400, f"Invalid purpose {purpose!r}: supported purposes are {', '.join(PURPOSES)}", "invalid_purpose", "purpose")
    filename = check_filename(file.filename)
    limit = settings.max_upload_bytes
    tmp_dir = settings.blobs_dir / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    handle = tempfile.NamedTemporaryFile(dir=tmp_dir, suffix=".upload", delete=False)
    tmp = Path(handle.name)
    try:
        with handle:
            while chunk := await file.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"File {filename!r} is larger than the limit of {limit} bytes", "file_too_large", "file")
                digest.update(chunk)
                handle.write(chunk)
        if size == 0:
            raise APIError(400, f"File {filename!r} is empty", "invalid_file", "file")
        try:
            file_format, n_examples = validate_upload(tmp, purpose)
        except DatasetError as error:
            message = str(error).replace(str(tmp), filename)
            kind = "prompt" if purpose != "fine-tune" else "safety pool" if is_pool_file(tmp) else \
                "preference" if is_preference_file(tmp) else "training"
            raise APIError(400, f"Invalid {kind} file: {message}", "invalid_file", "file") from None
        sha = digest.hexdigest()
        target = blob_path(settings, sha)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            tmp.unlink()
        else:
            os.replace(tmp, target)
        record = store.add_file({"id": new_id("file"), "tenant": tenant.name, "filename": filename, "purpose": purpose,
                                 "bytes": size, "sha256": sha, "created_at": now(), "status": "processed",
                                 "format": file_format, "n_examples": n_examples})
    finally:
        tmp.unlink(missing_ok=True)
    return file_object(record)


def _owned(request: Request, file_id: str, tenant: Tenant) -> dict:
    record = request.app.state.store.get_file(file_id, None if tenant.admin else tenant.name)
    if record is None:
        raise not_found("file", file_id, "file_id")
    return record


@router.get("", response_model=FileList, response_model_exclude_unset=True)
async def list_files(request: Request, purpose: str | None = None, limit: int = 10000, tenant: Tenant = Depends(current_tenant)):
    records = request.app.state.store.list_files(None if tenant.admin else tenant.name, purpose, limit)
    return {"object": "list", "data": [file_object(r) for r in records], "has_more": False}


@router.get("/{file_id}", response_model=File, response_model_exclude_unset=True)
async def retrieve_file(request: Request, file_id: str, tenant: Tenant = Depends(current_tenant)):
    return file_object(_owned(request, file_id, tenant))


@router.get("/{file_id}/content", response_class=FileResponse,
            responses={200: {"content": {"application/jsonl": {"schema": {"type": "string", "format": "binary"}}},
                             "description": "The file as uploaded (JSON Lines)"}})
async def file_content(request: Request, file_id: str, tenant: Tenant = Depends(current_tenant)):
    record = _owned(request, file_id, tenant)
    return FileResponse(blob_path(request.app.state.settings, record["sha256"]), media_type="application/jsonl",
                        filename=record["filename"])


@router.delete("/{file_id}", response_model=FileDeleted, response_model_exclude_unset=True)
async def delete_file(request: Request, file_id: str, tenant: Tenant = Depends(current_tenant)):
    record = _owned(request, file_id, tenant)
    store = request.app.state.store
    store.delete_file(file_id)
    # The content stays while another file record or any job still refers to it.
    if not store.blob_in_use(record["sha256"]) and not store.file_used_by_job(file_id):
        blob_path(request.app.state.settings, record["sha256"]).unlink(missing_ok=True)
    return {"id": file_id, "object": "file", "deleted": True}
