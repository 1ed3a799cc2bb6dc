"""The reward server as a Ray Serve application: an HTTP ingress, the router and the adapter pool.

    serve run serve/config.yaml                                  # the config file (autoscaling, resources)
    serve run serve.app:build_app model=models:/dmoerm-demo@champion
    dmoerm serve --model models:/dmoerm-demo@champion            # local Ray, embedded defaults

- ``Ingress`` (FastAPI): auth, body limits, validation, the three APIs (``/v1/reward``, OpenRLHF's
  ``/get_reward``, vLLM's ``/classify``), ``/healthz``, ``/v1/models``, ``/openapi.json``. Holds no model.
- ``Router``: the outer router; contexts of concurrent requests are coalesced with ``@serve.batch``.
- ``AdapterPool``: the base model once per replica with every category's LoRA experts, value heads and
  aggregators resident; requests are coalesced with ``@serve.batch`` into batches capped in tokens, and a
  batch is one call of the library's batched scorer (one mixed-adapter forward per category present).

Each model-holding replica checks the registry alias every ``reload_interval_s`` and swaps in a new version
in the background; batches in flight finish on the version they started with, and every response names
the version that scored it. The logic lives in ``dmoerm.serving``; this file is the Ray wiring.
"""

import asyncio
import dataclasses
import hmac
import logging
import os
import threading
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from dmoerm.modeling.reward_model import Score
from dmoerm.serving import api, service
from dmoerm.serving.service import Conversation, Row, ServedModel, ServeLimits

logger = logging.getLogger("dmoerm.serve")


class AppArgs(BaseModel):
    """Arguments of :func:`build_app` (``args:`` in serve/config.yaml, ``key=value`` after ``serve run``)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="models:/NAME@ALIAS, models:/NAME/VERSION, a bundle folder or s3:// prefix")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    base: str | None = Field(None, description="Read the base weights from here (same fingerprint)")
    template: str = Field("auto", description="Chat template of texts sent to /get_reward and /classify")
    auth_token_env: str = Field("DMOERM_SERVE_TOKEN", description="Env var holding the bearer token")
    require_auth: bool = Field(False, description="Refuse to start without a token in auth_token_env")
    limits: ServeLimits = Field(default_factory=ServeLimits)
    max_batch_tokens: int = Field(16384, ge=64, description="Token budget of one adapter-pool batch")
    max_router_batch: int = Field(256, ge=1, description="Contexts per router batch")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="How long a batch waits to fill")
    scorer_batch_size: int = Field(32, ge=1, description="Rows per forward inside a batch")
    reload_interval_s: float = Field(30.0, ge=0, description="Registry alias poll period (0: never)")
    torch_threads: int | None = Field(None, ge=1, description="torch threads per pool replica (default: its CPUs)")
    route_in_pool: bool = Field(False, description="Route inside the pool's batches instead of calling the Router "
                                                   "deployment (one hop less; not with categories_per_replica)")
    categories_per_replica: int | None = Field(
        None, ge=1, description="Multiplex categories over pool replicas (@serve.multiplexed): each replica keeps "
                                "the base once and at most this many categories' experts; None: all resident")


@dataclass
class ScoreRequest:
    """One HTTP request's rows for the pool; ``routed_version`` is the model version that routed them."""

    rows: list[Row]
    tokens: int
    routed_version: str | None = None
    overrides: list[bool] = field(default_factory=list)
    category: str | None = None  # multiplexed pools: every row is of this category


@dataclass
class ScoreResult:
    scores: list[Score]
    name: str
    version: str
    rerouted: bool = False
    error: tuple[int, str, str | None] | None = None


def _batch_tokens(items: list[ScoreRequest]) -> int:
    return sum(i.tokens for i in items)


def _threads(requested: int | None) -> None:
    """torch threads: as requested, else the CPUs Ray assigned this replica (at least one)."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(requested or max(1, int(cpus)))


class _ModelHolder:
    """A replica's :class:`ServedModel`, re-resolved from the registry in the background."""

    def _init_model(self, args: AppArgs, threads: int | None = None) -> None:
        _threads(threads)
        self.args = args
        self.tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        self.served = self._load(None)
        self.served.probe()
        if args.model.startswith("models:/") and "@" in args.model and args.reload_interval_s > 0:
            threading.Thread(target=self._poll, name="dmoerm-reload", daemon=True).start()

    def _poll(self) -> None:
        from dmoerm.serving.source import registry_version

        while True:
            time.sleep(self.args.reload_interval_s)
            try:
                self.reload_if_moved(registry_version)
            except Exception as e:  # the old version keeps serving; the next poll tries again
                logger.warning("reload check of %s failed: %s", self.args.model, e)

    def reload_if_moved(self, lookup) -> bool:
        """Load the version the alias points at now, probe it, then swap it in (one attribute store)."""
        version = lookup(self.args.model, self.tracking_uri)
        if version == self.served.version:
            return False
        logger.info("%s moved to version %s: loading it", self.args.model, version)
        new = self._load(version)
        new.probe()
        self.served = new  # batches in flight hold the old object and finish on it
        logger.info("now serving %s version %s", new.name, new.version)
        return True

    def _load(self, version: str | None) -> ServedModel:
        return ServedModel.load(self.args.model, self.tracking_uri, version, self.args.base,
                                self.args.scorer_batch_size, resident=self._resident())

    def _resident(self) -> int | None:
        return None  # every category

    async def check_health(self) -> None:
        """A real forward pass: a replica stuck in a forward (the lock is held) fails this by timing out."""
        await asyncio.to_thread(self.served.probe)

    def info(self) -> dict:
        multiplexed = self.args.categories_per_replica is not None
        in_pool = self.args.route_in_pool or self.served.model.router_inputs.source == "prefix"  # decoders: free
        return self.served.info() | {"routes_in_pool": in_pool and not multiplexed, "multiplexed": multiplexed}


# Defaults for `serve run serve.app:build_app`; serve/config.yaml states the same values (a test keeps them equal).
def _autoscale(max_replicas: int, target: int) -> dict:
    return {"min_replicas": 1, "max_replicas": max_replicas, "target_ongoing_requests": target,
            "upscale_delay_s": 10, "downscale_delay_s": 120}


@serve.deployment(name="Router", max_ongoing_requests=256, health_check_period_s=10, health_check_timeout_s=30,
                  ray_actor_options={"num_cpus": 0.5},
                  autoscaling_config=_autoscale(4, 32))
class Router(_ModelHolder):
    def __init__(self, args: dict) -> None:
        self._init_model(AppArgs.model_validate(args))  # threads: its assigned CPUs
        self.route.set_max_batch_size(self.args.max_router_batch)
        self.route.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)

    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.005, batch_size_fn=lambda items: sum(map(len, items)))
    async def route(self, batches: list[list]) -> list[tuple[list[tuple[str, float]], str]]:
        """Contexts of concurrent requests, routed in one call; each request gets its routes and the version."""
        served = self.served
        flat = [c for b in batches for c in b]
        routed = await asyncio.to_thread(served.route, flat)
        out, k = [], 0
        for b in batches:
            out.append((routed[k: k + len(b)], served.version))
            k += len(b)
        return out


@serve.deployment(name="AdapterPool", max_ongoing_requests=256, health_check_period_s=10, health_check_timeout_s=30,
                  graceful_shutdown_timeout_s=30, ray_actor_options={"num_cpus": 1},
                  autoscaling_config=_autoscale(8, 32))
class AdapterPool(_ModelHolder):
    def __init__(self, args: dict) -> None:
        from ray.serve.metrics import Histogram

        parsed = AppArgs.model_validate(args)
        self._init_model(parsed, parsed.torch_threads)
        self.score.set_max_batch_size(self.args.max_batch_tokens)
        self.score.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        self.batch_rows = Histogram("dmoerm_batch_rows", description="Rows per adapter-pool batch",
                                    boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512])
        self.batch_requests = Histogram("dmoerm_batch_requests", description="Requests per adapter-pool batch",
                                        boundaries=[1, 2, 4, 8, 16, 32, 64, 128])
        self.batch_tokens = Histogram("dmoerm_batch_tokens", description="Estimated tokens per batch",
                                      boundaries=[64, 256, 1024, 4096, 16384, 65536])
        self.stats = {"batches": 0, "max_rows": 0, "max_requests": 0, "rows": 0}

    def batch_stats(self) -> dict:
        """This replica's batching figures (benchmarks and tests read them through a handle)."""
        return dict(self.stats, replica=serve.get_replica_context().replica_id.unique_id)

    def _resident(self) -> int | None:
        """Multiplexed: the replica's own model holds one category (its probe and base); others load on demand."""
        return None if self.args.categories_per_replica is None else 1

    @serve.multiplexed(max_num_models_per_replica=2)
    async def category_model(self, category: str) -> ServedModel:
        """One category's experts on this replica's base (LRU over ``categories_per_replica`` categories)."""
        served = self.served
        if category in served.loaded_categories:
            return served
        self.stats["category_loads"] = self.stats.get("category_loads", 0) + 1
        return await asyncio.to_thread(served.with_category, category)

    async def _served_for(self, served: ServedModel, category: str | None) -> ServedModel:
        if self.args.categories_per_replica is None or category is None:
            return served
        model = await self.category_model(category)
        wrapper = getattr(self, "__serve_multiplex_wrapper", None)  # Serve's LRU: give it the configured size
        if wrapper is not None:
            wrapper.max_num_models_per_replica = self.args.categories_per_replica
        if model.version != served.version:  # cached before a reload: load this version's experts instead
            model = await asyncio.to_thread(served.with_category, category)
        return model

    def _prepare(self, served: ServedModel, item: ScoreRequest) -> tuple[list[Row], bool, tuple | None]:
        """The item's rows for ``served``: re-routed when another version routed them; a forced category this
        version lacks is a client error for that item alone."""
        rerouted = item.routed_version not in (None, served.version)
        rows = []
        for row, forced in zip(item.rows, item.overrides or [False] * len(item.rows)):
            if forced and row.category not in served.categories:
                return [], False, (422, f"category: unknown category {row.category!r}; this model has "
                                        f"{sorted(served.categories)}", "category")
            rows.append(Row(row.context, row.response, row.category if (forced or not rerouted) else None))
        return rows, rerouted, None

    @serve.batch(max_batch_size=16384, batch_wait_timeout_s=0.005, batch_size_fn=_batch_tokens)
    async def score(self, items: list[ScoreRequest]) -> list[ScoreResult]:
        served = self.served  # this batch finishes on this version even if a reload swaps it
        out: list[ScoreResult | None] = [None] * len(items)
        groups: dict[str | None, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(it.category if self.args.categories_per_replica else None, []).append(i)
        for category, idx in groups.items():
            model = await self._served_for(served, category)
            for i, res in zip(idx, await self._score_group(model, [items[i] for i in idx])):
                out[i] = res
        return out  # type: ignore[return-value]

    async def _score_group(self, served: ServedModel, items: list[ScoreRequest]) -> list[ScoreResult]:
        prepared = [self._prepare(served, it) for it in items]
        flat = [r for rows, _, err in prepared if err is None for r in rows]
        self.batch_rows.observe(len(flat))
        self.batch_requests.observe(len(items))
        self.batch_tokens.observe(_batch_tokens(items))
        self.stats.update(batches=self.stats["batches"] + 1, rows=self.stats["rows"] + len(flat),
                          max_rows=max(self.stats["max_rows"], len(flat)),
                          max_requests=max(self.stats["max_requests"], len(items)))
        try:
            scores = await asyncio.to_thread(served.score_rows, flat)
        except Exception:  # isolate the item that broke the batch; the others still get their rewards
            logger.exception("a batch of %d rows failed; scoring its %d requests one by one", len(flat), len(items))
            return [await self._alone(served, p) for p in prepared]
        out, k = [], 0
        for rows, rerouted, err in prepared:
            if err is not None:
                out.append(ScoreResult([], served.name, served.version, error=err))
                continue
            out.append(ScoreResult(scores[k: k + len(rows)], served.name, served.version, rerouted))
            k += len(rows)
        return out

    async def _alone(self, served: ServedModel, prepared: tuple) -> ScoreResult:
        rows, rerouted, err = prepared
        if err is not None:
            return ScoreResult([], served.name, served.version, error=err)
        try:
            return ScoreResult(await asyncio.to_thread(served.score_rows, rows), served.name, served.version, rerouted)
        except Exception as e:
            logger.exception("scoring failed")
            return ScoreResult([], served.name, served.version,
                               error=(500, f"scoring failed: {type(e).__name__}", None))


# ---- the HTTP ingress --------------------------------------------------------------------------------
fastapi_app = FastAPI(title="DMoERM reward server", version="1",
                      description="Rewards from a double-layer mixture-of-experts reward model. Errors are "
                                  "`{\"error\": {\"message\", \"type\", \"param\", \"code\"}}` with a 4xx status.")


def _error(status: int, message: str, field: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(api.RequestError(status, message, field, kind).body(), status_code=status)


@fastapi_app.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), None, "not_found" if exc.status_code == 404 else "http_error")


@fastapi_app.exception_handler(RequestValidationError)
async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error(422, str(exc.errors()[:1]))


def _body_doc(model: type[BaseModel], response: type[BaseModel]) -> dict:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    _EXTRA_SCHEMAS.update(schema.pop("$defs", {}))
    _EXTRA_SCHEMAS[model.__name__] = schema
    rschema = response.model_json_schema(ref_template="#/components/schemas/{model}")
    _EXTRA_SCHEMAS.update(rschema.pop("$defs", {}))
    _EXTRA_SCHEMAS[response.__name__] = rschema
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}},
            "responses": {"200": {"description": "OK", "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{response.__name__}"}}}}}}


_EXTRA_SCHEMAS: dict[str, dict] = {}


def _openapi() -> dict:
    from fastapi.openapi.utils import get_openapi

    if fastapi_app.openapi_schema is None:
        doc = get_openapi(title=fastapi_app.title, version=fastapi_app.version,
                          description=fastapi_app.description, routes=fastapi_app.routes)
        doc.setdefault("components", {}).setdefault("schemas", {}).update(_EXTRA_SCHEMAS)
        fastapi_app.openapi_schema = doc
    return fastapi_app.openapi_schema


fastapi_app.openapi = _openapi  # type: ignore[method-assign]


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused past ``limit`` bytes before it is read whole."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise api.RequestError(413, f"request body is {declared} bytes; the limit is {limit}", None,
                               "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise api.RequestError(413, f"request body exceeds the limit of {limit} bytes", None, "request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _estimate_tokens(rows: list[Row], max_length: int) -> int:
    """Token count of rows without a tokenizer (about 4 characters a token), each capped at max_length."""
    return sum(min(max_length, (sum(len(t.content) for t in r.context) + len(r.response)) // 4 + 8) for r in rows)


class _Served:
    """The slice of ServedModel the request parsers need, from the pool's model info."""

    def __init__(self, info: dict) -> None:
        self.name, self.version = info["id"], info["version"]
        self.categories, self.max_length = info["categories"], info["max_length"]


@serve.deployment(name="Ingress", max_ongoing_requests=512, ray_actor_options={"num_cpus": 0.25},
                  autoscaling_config=_autoscale(4, 64))
@serve.ingress(fastapi_app)
class Ingress:
    def __init__(self, args: dict, router: DeploymentHandle, pool: DeploymentHandle) -> None:
        from ray.serve.metrics import Counter, Histogram

        self.args = AppArgs.model_validate(args)
        self.limits = self.args.limits
        self.router, self.pool = router, pool
        self.token = os.environ.get(self.args.auth_token_env) or None
        if self.args.require_auth and not self.token:
            raise ValueError(f"require_auth is set but ${self.args.auth_token_env} is empty: no bearer token")
        self.info: dict | None = None
        self.requests = Counter("dmoerm_requests", description="HTTP requests by route and status",
                                tag_keys=("route", "status"))
        self.latency = Histogram("dmoerm_request_latency_ms", description="Request latency by route",
                                 boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000],
                                 tag_keys=("route",))
        self.routed = Counter("dmoerm_routed", description="Conversations routed, by category",
                              tag_keys=("category",))

    async def _model_info(self, refresh: bool = False) -> dict:
        if self.info is None or refresh:
            self.info = await self.pool.info.remote()
        return self.info

    def _authorised(self, request: Request) -> bool:
        if self.token is None:
            return True
        got = request.headers.get("authorization", "")
        return got.startswith("Bearer ") and hmac.compare_digest(got[7:].encode(), self.token.encode())

    async def _handle(self, route: str, request: Request, fn) -> JSONResponse:
        t0 = time.perf_counter()
        try:
            if not self._authorised(request):
                raise api.RequestError(401, "missing or wrong bearer token (Authorization: Bearer <token>)", None,
                                       "authentication_error")
            body = await fn(request)
            response = JSONResponse(body)
        except api.RequestError as e:
            response = JSONResponse(e.body(), status_code=e.status)
        except Exception as e:  # never a traceback to the client
            logger.exception("%s failed", route)
            response = _error(503, f"the model could not score this request right now ({type(e).__name__}); retry",
                              None, "server_error")
        self.requests.inc(tags={"route": route, "status": str(response.status_code)})
        self.latency.observe((time.perf_counter() - t0) * 1000, tags={"route": route})
        return response

    async def _score(self, convs: list[Conversation], info: dict) -> tuple[list[list[Score]], str, str]:
        """Route (once per conversation, unless forced or single-category), then score every row in one pool call."""
        todo = [c for c in convs if c.category is None]
        routed_version = None
        if todo and len(info["categories"]) > 1 and not info["routes_in_pool"]:
            routes, routed_version = await self._call(self.router.route, [c.context for c in todo])
            for c, r in zip(todo, routes):
                c.routed = r
                self.routed.inc(tags={"category": r[0]})
        rows = [r for c in convs for r in c.rows()]
        overrides = [c.category is not None for c in convs for _ in c.responses]
        result = await self._score_rows(rows, overrides, routed_version, info)
        if result.error is not None:
            raise api.RequestError(*result.error)
        if result.version != info["version"]:
            self.info = None  # a new version answers: refresh the model info on the next request
        per_conv = service.split_scores(convs, result.scores)
        for c, scores in zip(convs, per_conv):
            if c.routed and not result.rerouted:  # the pool was told the category: the router had the prob
                for s in scores:
                    s.category_prob = c.routed[1]
        return per_conv, result.name, result.version

    async def _score_rows(self, rows: list[Row], overrides: list[bool], routed_version: str | None,
                          info: dict) -> ScoreResult:
        """One pool call; multiplexed pools get one call per category (each to a replica holding it)."""
        def request(idx: list[int], category: str | None) -> ScoreRequest:
            part = [rows[i] for i in idx]
            return ScoreRequest(part, min(self.args.max_batch_tokens, _estimate_tokens(part, info["max_length"])),
                                routed_version, [overrides[i] for i in idx], category)

        if not info.get("multiplexed"):
            return await self._call(self.pool.score, request(list(range(len(rows))), None))
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(r.category or next(iter(info["categories"])), []).append(i)
        results = await asyncio.gather(*(self._call(self.pool.options(multiplexed_model_id=cat).score,
                                                    request(idx, cat)) for cat, idx in groups.items()))
        failed = next((r for r in results if r.error is not None), None)
        if failed is not None:
            return failed
        if len({r.version for r in results}) > 1:  # a reload landed between the groups: score them again
            return await self._score_rows(rows, overrides, routed_version, info)
        scores: list[Score | None] = [None] * len(rows)
        for (_, idx), res in zip(groups.items(), results):
            for i, sc in zip(idx, res.scores):
                scores[i] = sc
        return ScoreResult(scores, results[0].name, results[0].version,  # type: ignore[arg-type]
                           any(r.rerouted for r in results))

    async def _call(self, method, arg):
        """A deployment call, retried once when its replica died mid-request (the next one takes it)."""
        from ray.exceptions import RayActorError

        try:
            return await method.remote(arg)
        except RayActorError:
            logger.warning("a replica died during a request; retrying on another")
            return await method.remote(arg)

    async def _parse(self, request: Request, model: type[BaseModel]):
        return api.parse_body(await _read_body(request, self.limits.max_body_bytes), model, self.limits.max_body_bytes)

    @fastapi_app.post("/v1/reward", openapi_extra=_body_doc(api.RewardRequest, api.RewardResponse),
                      summary="Rewards for one conversation's responses (or a batch under 'inputs')")
    async def reward(self, request: Request) -> JSONResponse:
        async def run(req_: Request) -> dict:
            req = await self._parse(req_, api.RewardRequest)
            info = await self._model_info()
            convs = service.conversations_from_reward(req, _Served(info), self.limits)
            per_conv, name, version = await self._score(convs, info)
            results = [service.reward_result(c, s, len(info["categories"])) for c, s in zip(convs, per_conv)]
            if req.inputs is not None:
                return api.BatchRewardResponse(model=name, version=version, results=results).model_dump()
            return api.RewardResponse(model=name, version=version, **results[0].model_dump()).model_dump()

        return await self._handle("/v1/reward", request, run)

    @fastapi_app.post("/get_reward", openapi_extra=_body_doc(api.GetRewardRequest, api.GetRewardResponse),
                      summary="OpenRLHF remote reward model")
    async def get_reward(self, request: Request) -> JSONResponse:
        async def run(req_: Request) -> dict:
            req = await self._parse(req_, api.GetRewardRequest)
            info = await self._model_info()
            convs = service.conversations_from_get_reward(req, self.args.template, self.limits)
            per_conv, _, _ = await self._score(convs, info)
            return service.get_reward_response([s[0] for s in per_conv], info["categories"]).model_dump()

        return await self._handle("/get_reward", request, run)

    @fastapi_app.post("/classify", openapi_extra=_body_doc(api.ClassifyRequest, api.ClassifyResponse),
                      summary="vLLM-style classification (verl's reward loop)")
    async def classify(self, request: Request) -> JSONResponse:
        async def run(req_: Request) -> dict:
            req = await self._parse(req_, api.ClassifyRequest)
            info = await self._model_info()
            served = _Served(info)
            convs = service.conversations_from_classify(req, served, self.args.template, self.limits)
            per_conv, name, version = await self._score(convs, info)
            served.name = name
            return service.classify_response(req, [s[0] for s in per_conv], served).model_dump()

        return await self._handle("/classify", request, run)

    @fastapi_app.get("/v1/models", summary="The served model: name, version, categories and capabilities")
    async def models(self, request: Request) -> JSONResponse:
        async def run(_req: Request) -> dict:
            info = await self._model_info(refresh=True)
            return {"object": "list", "data": [info | {"limits": dataclasses.asdict(self.limits)}]}

        return await self._handle("/v1/models", request, run)

    @fastapi_app.get("/healthz", summary="Ready when the router and a pool replica each ran a real forward pass")
    async def healthz(self) -> JSONResponse:
        try:
            info = await asyncio.wait_for(self.pool.info.remote(), 30)
            await asyncio.wait_for(self.pool.check_health.remote(), 30)
            if len(info["categories"]) > 1 and not info.get("routes_in_pool"):
                await asyncio.wait_for(self.router.check_health.remote(), 30)
        except Exception as e:
            return _error(503, f"not ready: {type(e).__name__}", None, "server_error")
        return JSONResponse({"status": "ok", "model": info["id"], "version": info["version"]})


def build_app(args: dict) -> serve.Application:
    """The application for ``serve run`` / a Serve config's ``import_path: serve.app:build_app``."""
    parsed = AppArgs.model_validate(args)
    plain = parsed.model_dump()
    return Ingress.bind(plain, Router.bind(plain), AdapterPool.bind(plain))
