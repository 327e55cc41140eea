"""An ASGI app (Starlette) that loads a folder of models in its lifespan and serves inference.

    MODELS_DIR=./models AIOOV_CACHE_DIR=/var/cache/aioov AIOOV_INFERENCE_NUM_THREADS=2 \
        uvicorn examples.asgi_app:app --workers 4    # 8 cores: 8 // 4 threads per worker

Every worker process compiles nothing that another one already compiled: the first to
need a model compiles and publishes it; the others wait on the cache lock and import it.
Each model is warmed up (``WARMUP``, ``AIOOV_WARMUP`` inferences, default 1) before the
server reports ready, so that the first request costs what the later ones do.

    curl -X POST localhost:8000/models/bert/infer -d '{"input_ids": [[1, 2, 3]]}'
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import aioov

logger = logging.getLogger("uvicorn.error")  # uvicorn prints it; any other server, where configured


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    folder = Path(os.environ.get("MODELS_DIR", "models"))
    async with aioov.Core(cache_dir=os.environ.get("AIOOV_CACHE_DIR")) as core:
        results = await core.compile_all(
            sorted(folder.glob("*.onnx")), os.environ.get("AIOOV_DEVICE", "AUTO"),
            {"WARMUP": int(os.environ.get("AIOOV_WARMUP", "1")),
             # W workers on C cores: C // W threads each (docs/deployment.md); 0: onnxruntime's default
             "INFERENCE_NUM_THREADS": int(os.environ.get("AIOOV_INFERENCE_NUM_THREADS", "0"))},
        )
        app.state.models = {Path(str(r.model)).stem: r.compiled for r in results if r.ok}
        app.state.failed = {Path(str(r.model)).stem: str(r.error) for r in results if not r.ok}
        logger.info("aioov: %d models ready, cache %s", len(app.state.models), json.dumps(core.cache_stats.as_dict()))
        yield
    # After the Core closed: the background exports it finished are counted too.
    logger.info("aioov: stopped, cache %s", json.dumps(core.cache_stats.as_dict()))


async def list_models(request: Request) -> JSONResponse:
    models: dict[str, aioov.CompiledModel] = request.app.state.models
    return JSONResponse({
        "models": {name: {"inputs": [p.name for p in m.inputs],
                          "from_cache": m.get_property("LOADED_FROM_CACHE")} for name, m in models.items()},
        "failed": request.app.state.failed,
    })


async def infer(request: Request) -> JSONResponse:
    compiled = request.app.state.models.get(request.path_params["name"])
    if compiled is None:
        return JSONResponse({"error": "no such model"}, status_code=404)
    try:
        body = await request.json()
    except ValueError:
        return JSONResponse({"error": "the body must be JSON: {input name: nested lists}"}, status_code=400)
    if not isinstance(body, dict):
        return JSONResponse({"error": "the body must be a JSON object: {input name: nested lists}"}, status_code=400)
    try:
        # Lists as they came: aioov converts them to each input's type where no value changes
        outputs = await compiled.infer(body)
    except aioov.InferenceError as exc:  # wrong names, shapes or types, or onnxruntime failed on them
        return JSONResponse({"error": str(exc)}, status_code=422)
    return JSONResponse({name: np.asarray(value).tolist() for name, value in outputs.items()})


app = Starlette(
    routes=[Route("/models", list_models), Route("/models/{name}/infer", infer, methods=["POST"])],
    lifespan=lifespan,
)
