"""`safekeel replica`: one serving replica for an API server started with SAFEKEEL_REPLICAS (safekeel.service.replica)."""

from __future__ import annotations

import logging
import os
from typing import Optional

import typer

from safekeel.cli.common import fail as _fail


def replica_command(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 in a container)."),
    port: int = typer.Option(8001, help="TCP port."),
    model: Optional[str] = typer.Option(None, help="Base model to serve, under this name (default: $SAFEKEEL_BASE_MODELS' first)."),
    engine: Optional[str] = typer.Option(None, help="Engine: vllm (default) or transformers."),
) -> None:
    """Run one serving replica: an engine behind vLLM's /v1/completions and /v1/load_lora_adapter, for an API server
    started with SAFEKEEL_REPLICAS=URL,... (which routes requests to replicas by adapter)."""
    logging.basicConfig(level=os.environ.get("SAFEKEEL_LOG", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from safekeel.models.registry import ModelNotFoundError, resolve_model
    from safekeel.service.replica import create_replica_app
    from safekeel.service.settings import ServiceSettings

    overrides = {"base_models": [model]} if model else {}
    if engine:
        overrides["engine"] = engine
    try:
        settings = ServiceSettings(**overrides)
        model_path = str(resolve_model(settings.base_models[0]))
    except (ValueError, ModelNotFoundError) as error:
        _fail(str(error))
    typer.echo(f"safekeel replica serving {settings.base_models[0]} with {settings.engine} on http://{host}:{port}/v1")
    uvicorn.run(create_replica_app(settings.base_models[0], model_path, settings.engine, settings, settings.replica_api_key),
                host=host, port=port, log_level="warning")
