"""The multiplexed adapter pool (`categories_per_replica: 1`, two replicas): each replica keeps the base once
and loads categories on demand (@serve.multiplexed); rewards are those of the whole bundle in process."""

from __future__ import annotations

import httpx
import pytest

from dmoerm.data.records import Turn

pytestmark = [pytest.mark.ray, pytest.mark.integration, pytest.mark.slow]


def test_multiplexed_pool_scores_every_category_like_the_whole_bundle(server):
    from ray import serve

    (version, bundle), = [(v, b) for v, b in server.bundles.items() if server.paths[v]]
    items = [{"prompt": f"question {i}", "responses": [f"answer {i}", "no"], "category": cat}
             for i, cat in enumerate(["chat", "qa", "chat", "qa"])] + [{"prompt": "routed one", "response": "ok"}]
    auth = {"Authorization": f"Bearer {server.token}"}
    with httpx.Client(base_url=server.url + "/mux", headers=auth, timeout=60) as c:
        info = c.get("/v1/models").json()["data"][0]
        assert info["multiplexed"] is True and set(info["categories"]) == {"chat", "qa"}
        for _ in range(3):  # alternate categories over the LRU of one category per replica
            body = c.post("/v1/reward", json={"inputs": items}).json()
            for item, res in zip(items, body["results"]):
                want = bundle.model.score([[Turn("user", item["prompt"])]] * len(item.get("responses", [1])),
                                          item.get("responses") or [item["response"]],
                                          [item.get("category")] * len(item.get("responses", [1])))
                assert res["rewards"] == pytest.approx([w.reward for w in want], abs=1e-5)
                assert res["category"] == want[0].category
    pool = serve.get_deployment_handle("AdapterPool", app_name="mux")
    # Serve sends a "qa" call to a replica that has "qa" loaded; none has it resident (each keeps "chat"), so
    # that replica loaded it on demand
    stats = pool.options(multiplexed_model_id="qa").batch_stats.remote().result()
    assert stats.get("category_loads", 0) > 0, stats
