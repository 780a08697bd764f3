"""GET /openapi.json and /docs: the document describes exactly the app's routes, its security matches
what the gateway enforces, and schemathesis finds no 5xx and no answer that contradicts it."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from ingest_gateway.app import ROUTES
from ingest_gateway.openapi import document

# /metrics is public like the probes; webhooks check a signature of their own instead of a key.
PUBLIC = {"/healthz", "/readyz", "/openapi.json", "/docs", "/metrics", "/v1/webhooks/{source}"}


def _route_pairs() -> set[tuple[str, str]]:
    pairs = set()
    for route in ROUTES:
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)  # {event_id:path} -> {event_id}
        pairs |= {(path, m.lower()) for m in route.methods or () if m != "HEAD"}
    return pairs


def _document_pairs() -> set[tuple[str, str]]:
    return {(path, method) for path, ops in document()["paths"].items() for method in ops}


def test_the_document_has_exactly_the_apps_routes():
    assert _route_pairs() - _document_pairs() == set(), "routes missing from the document"
    assert _document_pairs() - _route_pairs() == set(), "the document describes routes the app does not have"


def test_the_document_is_openapi_3_1_with_bearer_security_on_every_v1_route():
    doc = document()
    assert doc["openapi"].startswith("3.1")
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key.",
    }
    assert doc["security"] == [{"bearer": []}]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            public = op.get("security") == []
            assert public == (path in PUBLIC), (method, path)
            if not public:
                assert "401" in op["responses"], (method, path)
    # every error answer uses the one error shape
    for name, response in doc["components"]["responses"].items():
        assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}, (
            name
        )
    schemathesis.openapi.from_dict(doc)  # loads (refs resolve)


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
            return r.status, r.headers["content-type"], r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["content-type"], exc.read()


def test_openapi_json_and_docs_are_public_and_the_page_needs_no_outside_assets(gateway_url):
    code, content_type, body = _get(gateway_url + "/openapi.json")
    assert code == 200 and content_type.startswith("application/json")
    assert json.loads(body) == json.loads(json.dumps(document()))
    code, content_type, body = _get(gateway_url + "/docs")
    assert code == 200 and content_type.startswith("text/html")
    page = body.decode()
    assert 'fetch("/openapi.json")' in page
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", page), "the page must not load outside assets"


def test_the_gateway_enforces_the_documented_security(gateway_url):
    """Without a key every secured operation answers 401, every public one does not."""
    for path, ops in document()["paths"].items():
        for method, op in ops.items():
            url = gateway_url + path.replace("{", "x").replace("}", "")
            request = urllib.request.Request(
                url, method=method.upper(), data=b"{}" if method != "get" else None
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as r:
                    code = r.status
            except urllib.error.HTTPError as exc:
                code = exc.code
            assert (code == 401) == (op.get("security") != []), (method, path, code)


# --- schemathesis against the real gateway ---------------------------------------------------------

schema = (
    schemathesis.openapi.from_dict(document())
    # Keys are not truncated between tests (the session's admin key lives there): leave them alone.
    .exclude(path="/v1/keys", method="POST")
    .exclude(path="/v1/keys/{key_id}", method="DELETE")
)


@schemathesis.serializer("application/x-ndjson")
def _ndjson(ctx: object, value: object) -> bytes:
    """The document describes an NDJSON body as an array of events: one line each."""
    items = value if isinstance(value, list) else [value]
    return "\n".join(json.dumps(item) for item in items).encode()


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@schema.parametrize()
@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(case, gateway_url, admin_key):
    case.call_and_validate(
        base_url=gateway_url, headers={"Authorization": f"Bearer {admin_key}"}, checks=CHECKS
    )
