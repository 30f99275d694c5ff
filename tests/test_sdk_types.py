"""The SDK's dataclasses agree with the OpenAPI document's answer schemas."""

from __future__ import annotations

import dataclasses
import json

from progress_client import models
from server.web.openapi import encoded_document

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
