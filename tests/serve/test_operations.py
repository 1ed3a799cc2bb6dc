"""Operations under load: the adapter pool scales 1 -> 2 -> 1; a killed replica fails at most 1% of
requests and the deployment recovers; moving the registry alias fails no request and the new version
answers; Prometheus metrics carry request counts, latencies, batch sizes and routed categories."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from serve_fixtures import MODEL, in_process, make_bundle, register, set_champion

from dmoerm.data.records import Turn

pytestmark = [pytest.mark.ray, pytest.mark.integration, pytest.mark.slow]
APP, POOL = "dmoerm", "AdapterPool"


def pool_replicas() -> int:
    from ray import serve

    dep = serve.status().applications[APP].deployments[POOL]
    return int(dep.replica_states.get("RUNNING", 0))


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.5):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class Load:
    """``concurrency`` clients posting single-response /v1/reward requests until stopped."""

    def __init__(self, server, concurrency: int) -> None:
        self.server, self.concurrency = server, concurrency
        self.ok, self.failed, self.versions = 0, [], []
        self.stop = asyncio.Event()

    async def _client(self, i: int) -> None:
        async with self.server.async_client(timeout=60) as c:
            n = 0
            while not self.stop.is_set():
                n += 1
                try:
                    r = await c.post("/v1/reward", json={"prompt": f"load {i} {n}", "response": f"answer {n % 7}"})
                except httpx.HTTPError as e:
                    self.failed.append(repr(e))
                    continue
                if r.status_code == 200:
                    self.ok += 1
                    self.versions.append(r.json()["version"])
                else:
                    self.failed.append(f"{r.status_code} {r.text[:200]}")

    async def run_until(self, condition, timeout_s: float) -> None:
        """Run the load, check ``condition`` (a blocking callable, run in a thread) until it holds."""
        tasks = [asyncio.create_task(self._client(i)) for i in range(self.concurrency)]
        try:
            deadline = time.time() + timeout_s
            while not await asyncio.to_thread(condition):
                if time.time() > deadline:
                    raise AssertionError(f"condition not reached within {timeout_s:.0f} s under load")
                await asyncio.sleep(0.5)
        finally:
            self.stop.set()
            await asyncio.gather(*tasks)

    @property
    def total(self) -> int:
        return self.ok + len(self.failed)


def test_pool_scales_up_under_load_and_back_down(server):
    wait_for(lambda: pool_replicas() == 1, 60, "one pool replica at rest")
    load = Load(server, concurrency=8)
    asyncio.run(load.run_until(lambda: pool_replicas() >= 2, timeout_s=90))
    assert load.ok > 0 and not load.failed, load.failed[:3]
    wait_for(lambda: pool_replicas() == 1, 90, "the pool to scale back to one replica")


def test_killing_a_replica_under_load_fails_at_most_one_percent(server):
    import ray

    wait_for(lambda: pool_replicas() == 1, 90, "one pool replica at rest")
    load = Load(server, concurrency=8)
    killed: list[str] = []

    def kill_one_of_two() -> bool:
        if not killed:
            if pool_replicas() < 2:
                return False
            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                     if a["namespace"] == "serve" and f"#{POOL}#" in a["name"]]
            ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
            killed.append(names[0])
            return False
        return load.ok > 300  # keep the load on while the deployment replaces the replica

    asyncio.run(load.run_until(kill_one_of_two, timeout_s=180))
    assert killed
    assert len(load.failed) <= 0.01 * load.total, (len(load.failed), load.total, load.failed[:3])

    def recovered() -> bool:
        from ray import serve

        return serve.status().applications[APP].deployments[POOL].status == "HEALTHY" and pool_replicas() >= 1

    wait_for(recovered, 90, "the pool to be healthy again")
    with server.client() as c:
        assert c.post("/v1/reward", json={"prompt": "after", "response": "the kill"}).status_code == 200


def test_moving_the_alias_under_load_fails_nothing_and_the_new_version_answers(server, tmp_path, tiny_bert_dir):
    from dmoerm.bundle import load_bundle

    with server.client() as c:
        before = c.get("/v1/models").json()["data"][0]["version"]
    bundle = make_bundle(tmp_path, tiny_bert_dir, seed=7)
    version = register(server.tracking_uri, bundle)
    server.bundles[version] = load_bundle(bundle)
    assert version != before
    load = Load(server, concurrency=4)
    moved: list[bool] = []

    def move_then_wait() -> bool:
        if not moved and load.ok > 20:
            set_champion(server.tracking_uri, version)
            moved.append(True)
        return bool(moved) and load.versions[-20:] == [version] * 20

    asyncio.run(load.run_until(move_then_wait, timeout_s=120))
    assert not load.failed, load.failed[:3]
    assert before in load.versions and version in load.versions
    with server.client() as c:
        body = c.post("/v1/reward", json={"prompt": "which version?", "responses": ["this one", "no"]}).json()
    assert body["version"] == version and body["model"] == MODEL
    want = in_process(server, version, [[Turn("user", "which version?")]] * 2, ["this one", "no"])
    assert body["rewards"] == pytest.approx([s.reward for s in want], abs=1e-5)


def test_prometheus_metrics(server):
    with server.client() as c:
        for i in range(5):
            assert c.post("/v1/reward", json={"prompt": f"metrics {i}", "response": "x"}).status_code == 200
        c.post("/v1/reward", json={"prompt": 1})

    def scraped() -> str | None:
        try:
            text = httpx.get(server.metrics_url, timeout=10).text
        except httpx.HTTPError:
            return None
        names = ("ray_dmoerm_requests", "ray_dmoerm_request_latency_ms_bucket", "ray_dmoerm_batch_rows_bucket",
                 "ray_dmoerm_routed", "ray_serve_num_http_requests")
        lines = [ln for ln in text.splitlines() if ln.startswith("ray_dmoerm_requests")]
        rejected = any('status="422"' in ln and 'route="/v1/reward"' in ln for ln in lines)
        return text if rejected and all(n in text for n in names) else None

    text = wait_for(scraped, 90, "dmoerm metrics on the Prometheus endpoint", poll_s=2)
    lines = [ln for ln in text.splitlines() if ln.startswith("ray_dmoerm_requests")]
    assert any('status="200"' in ln for ln in lines), lines[:10]
