"""The SDK's dataclasses agree with the OpenAPI document's answer schemas."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from progress_client import models
from server.web.openapi import encoded_document

from .helpers import PASSWORD

#: SDK fields that are not in the wire shape (derived, or the raw message kept).
SDK_ONLY = {"task", "recovered", "raw"}


def properties(name: str) -> set[str]:
    document = json.loads(encoded_document())
    return set(document["components"]["schemas"][name]["properties"])


def test_sdk_task_and_event_fields_are_the_documents() -> None:
    """Every field of progress_client's Task and Event is a property of the document's
    Task and Event (or one of the snapshot's), with the same name."""
    task_fields = {f.name for f in dataclasses.fields(models.Task)}
    assert task_fields <= properties("Task"), task_fields - properties("Task")
    event_fields = {f.name for f in dataclasses.fields(models.Event)} - SDK_ONLY
    assert event_fields <= properties("Event"), event_fields - properties("Event")


def test_sdk_api_key_and_share_fields_are_the_documents() -> None:
    """ApiKey and ShareLink mirror the document's ApiKey/NewApiKey and Share."""
    key_fields = {f.name for f in dataclasses.fields(models.ApiKey)}
    assert key_fields <= properties("ApiKey") | properties("NewApiKey")
    share_fields = {f.name for f in dataclasses.fields(models.ShareLink)}
    assert share_fields <= properties("Share")


async def test_the_sdk_builds_a_tree_and_reads_it_back(aiohttp_server: Any, config: Any) -> None:
    """create_task(parent_id=, weight=, auto_finish=) and list_children against the real
    app: the parent's progress, rate, children counts and result come back typed."""
    from progress_client import AsyncClient
    from server.web.app import create_app

    from .sdk_support import register

    server = await aiohttp_server(create_app(config))
    url = str(server.make_url("")).rstrip("/")
    await register(url)
    async with AsyncClient(url, username="alice", password=PASSWORD) as client:
        parent = await client.create_task("batch", auto_finish=True)
        heavy = await client.create_task("file", parent_id=parent.id, weight=3)
        light = await client.create_task("file", parent_id=parent.id)
        await client.post_progress(heavy.id, 50)
        got = await client.get_task(parent.id)
        assert got.progress == 37.5 and got.children["running"] == 1 and got.auto_finish
        children = await client.list_children(parent.id)
        assert [c.id for c in children] == [heavy.id, light.id]
        assert [c.weight for c in children] == [3, 1]
        for child in children:
            await client.complete(child.id)
        done = await client.get_task(parent.id)
        assert done.status == "completed" and done.children["completed"] == 2
        events = await client.list_events(parent.id)
        assert {e.child["id"] for e in events if e.child} == {heavy.id, light.id}
