"""Parent and child tasks: weighted progress, child events on the parent, auto_finish,
fail_fast, cascading cancel, limits, and the multi-code analysis."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from server.config import Config
from server.web.app import create_app

from .helpers import auth_headers, register


async def new_task(client: TestClient, token: str, **body: Any) -> dict[str, Any]:
    resp = await client.post(
        "/api/v1/tasks", json={"kind": "job", **body}, headers=auth_headers(token)
    )
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def post(client: TestClient, token: str, path: str, body: Any = None) -> tuple[int, Any]:
    resp = await client.post(f"/api/v1/tasks/{path}", json=body or {}, headers=auth_headers(token))
    return resp.status, await resp.json()


async def get(client: TestClient, token: str, path: str) -> Any:
    resp = await client.get(f"/api/v1/tasks/{path}", headers=auth_headers(token))
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def events(client: TestClient, token: str, task_id: str) -> list[dict[str, Any]]:
    return (await get(client, token, f"{task_id}/events"))["events"]


def weighted_mean(progress: dict[str, float], weights: dict[str, float]) -> float:
    return sum(progress[c] * weights[c] for c in weights) / sum(weights.values())


async def test_a_parent_shows_the_weighted_mean_of_its_children(client: TestClient) -> None:
    """Weights 3, 1, 1: progress is their weighted mean; a finished child (failed too)
    counts 100; the task carries parent_id, weight and children counts."""
    token = await register(client, "alice")
    parent = await new_task(client, token)
    assert parent["children"] == {
        "total": 0,
        "pending": 0,
        "running": 0,
        "completed": 0,
        "failed": 0,
        "cancelled": 0,
    }
    a = await new_task(client, token, parent_id=parent["id"], weight=3)
    b = await new_task(client, token, parent_id=parent["id"])
    c = await new_task(client, token, parent_id=parent["id"], weight=1.0)
    assert (a["parent_id"], a["weight"], b["weight"]) == (parent["id"], 3, 1)
    await post(client, token, f"{a['id']}/progress", {"progress": 40})
    got = await get(client, token, parent["id"])
    assert got["progress"] == pytest.approx(3 * 40 / 5)
    assert got["status"] == "running"
    await post(client, token, f"{b['id']}/fail", {"error": "x"})
    await post(client, token, f"{c['id']}/progress", {"progress": 50})
    got = await get(client, token, parent["id"])
    assert got["progress"] == pytest.approx((3 * 40 + 100 + 50) / 5)
    assert got["children"] == {
        "total": 3,
        "pending": 0,
        "running": 2,
        "completed": 0,
        "failed": 1,
        "cancelled": 0,
    }
    children = await get(client, token, f"{parent['id']}/children")
    assert [t["id"] for t in children["tasks"]] == [a["id"], b["id"], c["id"]]
    assert [t["status"] for t in children["tasks"]] == ["running", "failed", "running"]
    assert children["next_cursor"] is None


async def test_each_child_event_that_moves_the_parent_is_a_parent_event_naming_it(
    client: TestClient,
) -> None:
    """The parent's progress events carry `child` {id, seq, status, progress}, with rate and
    eta_s; watching the parent alone shows the tree move."""
    token = await register(client, "alice")
    parent = await new_task(client, token)
    child = await new_task(client, token, parent_id=parent["id"])
    await post(client, token, f"{child['id']}/progress", {"progress": 25})
    await post(client, token, f"{child['id']}/progress", {"progress": 25})  # no change
    await post(client, token, f"{child['id']}/complete")
    got = await events(client, token, parent["id"])
    assert [(e["seq"], e["event"]) for e in got] == [
        (1, "created"),
        (2, "started"),
        (3, "progress"),
        (4, "progress"),
    ]
    assert got[2]["child"] == {"id": child["id"], "seq": 3, "status": "running", "progress": 25}
    assert got[3]["child"] == {"id": child["id"], "seq": 5, "status": "completed", "progress": 100}
    assert got[3]["progress"] == 100 and "rate" in got[3] and "eta_s" in got[3]


async def test_a_parents_own_progress_posts_are_refused_while_it_has_children(
    client: TestClient,
) -> None:
    """409 progress_from_children, nothing stored; finishing it by hand is allowed."""
    token = await register(client, "alice")
    parent = await new_task(client, token)
    await post(client, token, f"{parent['id']}/progress", {"progress": 10})
    await new_task(client, token, parent_id=parent["id"])
    status, body = await post(client, token, f"{parent['id']}/progress", {"progress": 20})
    assert (status, body["error"]["code"]) == (409, "progress_from_children")
    status, body = await post(
        client, token, f"{parent['id']}/progress", {"updates": [{"progress": 20}]}
    )
    assert status == 409


async def test_the_task_list_can_keep_only_root_tasks(client: TestClient) -> None:
    """GET /tasks?root=true lists tasks with no parent (a tree is one entry); without it,
    every task; `root` must be a boolean."""
    token = await register(client, "alice")
    alone = await new_task(client, token)
    parent = await new_task(client, token)
    for _ in range(2):
        await new_task(client, token, parent_id=parent["id"])

    async def listed(query: str) -> tuple[int, Any]:
        resp = await client.get(f"/api/v1/tasks{query}", headers=auth_headers(token))
        return resp.status, await resp.json()

    status, roots = await listed("?root=true")
    assert status == 200 and [t["id"] for t in roots["tasks"]] == [parent["id"], alone["id"]]
    assert len((await listed(""))[1]["tasks"]) == 4
    _, active = await listed("?status=active&root=true&limit=1")
    assert [t["id"] for t in active["tasks"]] == [parent["id"]]
    assert active["next_cursor"] is not None
    status, refused = await listed("?root=perhaps")
    assert status == 422 and "root" in refused["error"]["fields"]


async def test_bad_parents_are_refused(client: TestClient) -> None:
    """Unknown or foreign parent 404, finished parent 409, bad weight or flags 422."""
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    bobs = await new_task(client, bob)
    done = await new_task(client, alice)
    await post(client, alice, f"{done['id']}/complete")
    for body, status, code in (
        ({"parent_id": "0" * 32}, 404, "not_found"),
        ({"parent_id": bobs["id"]}, 404, "not_found"),
        ({"parent_id": done["id"]}, 409, "parent_finished"),
        ({"weight": 0}, 422, "validation_error"),
        ({"weight": -1}, 422, "validation_error"),
        ({"weight": "2"}, 422, "validation_error"),
        ({"fail_fast": True}, 422, "validation_error"),
        ({"auto_finish": "yes"}, 422, "validation_error"),
        ({"parent_id": 5}, 422, "validation_error"),
    ):
        resp = await client.post(
            "/api/v1/tasks", json={"kind": "job", **body}, headers=auth_headers(alice)
        )
        assert (resp.status, (await resp.json())["error"]["code"]) == (status, code), body
    assert (await get(client, bob, bobs["id"]))["children"]["total"] == 0


async def test_depth_is_at_most_four_below_a_root(client: TestClient) -> None:
    """Root, then four levels: fine; a fifth level is 422."""
    token = await register(client, "alice")
    task = await new_task(client, token)
    for _ in range(4):
        task = await new_task(client, token, parent_id=task["id"])
    resp = await client.post(
        "/api/v1/tasks", json={"kind": "job", "parent_id": task["id"]}, headers=auth_headers(token)
    )
    assert resp.status == 422 and "parent_id" in (await resp.json())["error"]["fields"]


async def test_a_parent_has_at_most_a_thousand_children(
    aiohttp_client: Any, config: Config
) -> None:
    """The 1,001st child is 422; the children list pages through all of them."""
    client = await aiohttp_client(
        create_app(dataclasses.replace(config, task_create_rate=0, max_unfinished_tasks_per_user=0))
    )
    token = await register(client, "alice")
    parent = await new_task(client, token)
    for start in range(0, 1000, 100):
        await asyncio.gather(
            *(new_task(client, token, parent_id=parent["id"]) for _ in range(start, start + 100))
        )
    resp = await client.post(
        "/api/v1/tasks",
        json={"kind": "job", "parent_id": parent["id"]},
        headers=auth_headers(token),
    )
    assert resp.status == 422
    seen, cursor = [], None
    while True:
        query = f"?limit=300&cursor={cursor}" if cursor else "?limit=300"
        page = await get(client, token, f"{parent['id']}/children{query}")
        seen += [t["id"] for t in page["tasks"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 1000
    assert (await get(client, token, parent["id"]))["children"]["pending"] == 1000


async def test_auto_finish_completes_with_the_childrens_ids_and_statuses(
    client: TestClient,
) -> None:
    """auto_finish: completed once every child completed, its result listing them."""
    token = await register(client, "alice")
    parent = await new_task(client, token, auto_finish=True)
    kids = [await new_task(client, token, parent_id=parent["id"]) for _ in range(3)]
    for kid in kids[:2]:
        await post(client, token, f"{kid['id']}/complete")
    assert (await get(client, token, parent["id"]))["status"] == "running"
    await post(client, token, f"{kids[2]['id']}/complete")
    done = await get(client, token, parent["id"])
    assert (done["status"], done["progress"], done["auto_finish"]) == ("completed", 100, True)
    assert done["result"] == {"children": [{"id": k["id"], "status": "completed"} for k in kids]}
    seqs = [e["seq"] for e in await events(client, token, parent["id"])]
    assert seqs == list(range(1, len(seqs) + 1))


async def test_auto_finish_fails_when_the_last_child_ends_with_a_failure(
    client: TestClient,
) -> None:
    """Without fail_fast a failed child does not end the parent; the last one does: failed."""
    token = await register(client, "alice")
    parent = await new_task(client, token, auto_finish=True)
    a = await new_task(client, token, parent_id=parent["id"])
    b = await new_task(client, token, parent_id=parent["id"])
    await post(client, token, f"{a['id']}/fail", {"error": "boom"})
    assert (await get(client, token, parent["id"]))["status"] == "running"
    await post(client, token, f"{b['id']}/complete")
    done = await get(client, token, parent["id"])
    assert done["status"] == "failed" and "1 of 2" in done["error"]


async def test_fail_fast_fails_the_parent_and_cancels_the_rest(client: TestClient) -> None:
    """fail_fast: the first failed child fails the parent; its other children are
    cancelled, each with its own event."""
    token = await register(client, "alice")
    parent = await new_task(client, token, auto_finish=True, fail_fast=True)
    a = await new_task(client, token, parent_id=parent["id"])
    b = await new_task(client, token, parent_id=parent["id"])
    await post(client, token, f"{b['id']}/progress", {"progress": 30})
    await post(client, token, f"{a['id']}/fail", {"error": "boom"})
    done = await get(client, token, parent["id"])
    assert done["status"] == "failed" and a["id"] in done["error"]
    other = await events(client, token, b["id"])
    assert other[-1]["event"] == "cancelled" and other[-1]["error"] == "parent task failed"
    assert done["children"]["failed"] == 1 and done["children"]["cancelled"] == 1


async def test_cancelling_a_parent_cancels_its_unfinished_descendants(
    client: TestClient,
) -> None:
    """Each unfinished child and grandchild gets a cancelled event; finished ones stay."""
    token = await register(client, "alice")
    root = await new_task(client, token)
    done = await new_task(client, token, parent_id=root["id"])
    await post(client, token, f"{done['id']}/complete")
    mid = await new_task(client, token, parent_id=root["id"])
    leaf = await new_task(client, token, parent_id=mid["id"])
    status, body = await post(client, token, f"{root['id']}/cancel")
    assert status == 200
    for task, expected in ((done, "completed"), (mid, "cancelled"), (leaf, "cancelled")):
        assert (await get(client, token, task["id"]))["status"] == expected
    root_events = await events(client, token, root["id"])
    assert root_events[-1]["event"] == "cancelled" and root_events[-1]["seq"] == body["seq"]


async def test_concurrent_children_keep_the_parent_gapless_and_exact(client: TestClient) -> None:
    """Eight children posting at once: the parent's seqs are 1..N, and after every parent
    event its progress is the weighted mean of what its `child` fields reported so far."""
    token = await register(client, "alice")
    parent = await new_task(client, token)
    weights = {}
    for w in (1, 2, 3, 4, 1, 2, 3, 4):
        kid = await new_task(client, token, parent_id=parent["id"], weight=w)
        weights[kid["id"]] = float(w)

    async def work(child_id: str) -> None:
        for p in range(5, 101, 5):
            await post(client, token, f"{child_id}/progress", {"progress": p})

    await asyncio.gather(*(work(c) for c in weights))
    got = await events(client, token, parent["id"])
    assert [e["seq"] for e in got] == list(range(1, len(got) + 1))
    seen = dict.fromkeys(weights, 0.0)
    for event in got:
        if event.get("child"):
            seen[event["child"]["id"]] = event["child"]["progress"]
            assert event["progress"] == pytest.approx(weighted_mean(seen, weights), abs=1e-4)
    assert got[-1]["progress"] == 100


async def test_a_multi_code_analysis_is_a_parent_that_ranks_its_children(
    aiohttp_client: Any, config: Config
) -> None:
    """{"codes": [...]}: one parent with an analysis child per code; when they are done
    the parent completes by itself with the codes ranked by score."""
    client = await aiohttp_client(create_app(config))
    token = await register(client, "alice")
    resp = await client.post(
        "/api/v1/stock/analyze",
        json={"codes": ["600519", "aapl", "MSFT"]},
        headers=auth_headers(token),
    )
    assert resp.status == 201, await resp.text()
    parent = await resp.json()
    assert parent["kind"] == "stock_analysis_batch" and parent["children"]["total"] == 3
    assert parent["params"] == {"codes": ["600519", "AAPL", "MSFT"]}
    async with asyncio.timeout(20):
        while (done := await get(client, token, parent["id"]))["status"] != "completed":
            await asyncio.sleep(0.05)
    ranking = done["result"]["ranking"]
    assert sorted(r["code"] for r in ranking) == ["600519", "AAPL", "MSFT"]
    assert [r["rank"] for r in ranking] == [1, 2, 3]
    assert [r["score"] for r in ranking] == sorted((r["score"] for r in ranking), reverse=True)
    children = (await get(client, token, f"{parent['id']}/children"))["tasks"]
    assert {c["kind"] for c in children} == {"stock_analysis"}
    for bad in (
        {"codes": []},
        {"codes": ["X"] * 21},
        {"codes": ["AAPL", "aapl"]},
        {"code": "AAPL", "codes": ["MSFT"]},
        {},
    ):
        resp = await client.post("/api/v1/stock/analyze", json=bad, headers=auth_headers(token))
        assert resp.status == 422, bad


async def test_cancelling_a_multi_code_analysis_stops_its_running_jobs(
    aiohttp_client: Any, config: Config
) -> None:
    """Cancel the parent: every child analysis gets a cancelled event and its job stops."""
    from server.web.keys import jobs_key

    app = create_app(dataclasses.replace(config, job_step_delay=5.0))
    client = await aiohttp_client(app)
    token = await register(client, "alice")
    resp = await client.post(
        "/api/v1/stock/analyze", json={"codes": ["AAPL", "MSFT"]}, headers=auth_headers(token)
    )
    parent = await resp.json()
    async with asyncio.timeout(10):
        while app[jobs_key].running_count < 2:
            await asyncio.sleep(0.02)
    status, _ = await post(client, token, f"{parent['id']}/cancel")
    assert status == 200
    async with asyncio.timeout(10):
        while app[jobs_key].running_count:
            await asyncio.sleep(0.02)
    children = (await get(client, token, f"{parent['id']}/children"))["tasks"]
    assert [c["status"] for c in children] == ["cancelled", "cancelled"]
