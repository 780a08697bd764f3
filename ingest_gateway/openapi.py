"""``GET /openapi.json`` (the API as an OpenAPI 3.1 document) and ``GET /docs`` (a page rendering it).

The document is written by hand, route by route, and ``tests/test_openapi.py`` holds it to the app's
routes table (every route in the document and nothing else) and runs schemathesis against the real
gateway (no 5xx, every answer as documented). Both routes are public: no API key needed.
"""

from __future__ import annotations

import functools
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from ingest_gateway.http import json_response
from ingest_gateway.openapi_parts import (
    _ADMIN,
    _ERROR_TEXT,
    _INT,
    _NUM,
    _PAGING,
    _READ,
    _SCHEMAS,
    _STR,
    JSON,
    _errors,
    _obj,
    _ok,
    _p,
    _q,
    _ref,
)

_USAGE_PARAMS = [
    _q("from", "Start of the range (RFC 3339), included.", required=True),
    _q("to", "End of the range (RFC 3339), excluded.", required=True),
    _q("window", "minute, hour, day or month.", {"enum": ["minute", "hour", "day", "month"]}),
    _q("group_by", "customer_id and/or the meter's dimensions, comma-separated."),
    _q("customer_id", "Only this customer."),
    _q("tz", "IANA time zone of the windows (default UTC)."),
    {
        "name": "filter",
        "in": "query",
        "style": "deepObject",
        "explode": True,
        "description": "filter[<dimension>]=<value>: only rows whose dimension (customer_id or one of the "
        "meter's) has this value; repeat a dimension for any of several values.",
        "schema": {"type": "object", "additionalProperties": _STR},
    },
]
_INVOICE_FILTERS = [
    _q("customer_id", "Only this customer."),
    _q("period", "A month, YYYY-MM."),
    _q("status", "draft or final."),
]
_CUSTOMER_ID = _p("customer_id", "The customer's id (1 to 256 characters).")
_INVOICE_ID = _p("invoice_id", "The invoice's id.")
_BODY_EVENTS = {
    "required": True,
    "content": {
        JSON: {"schema": {"oneOf": [_ref("Event"), {"type": "array", "items": _ref("Event")}]}},
        "application/x-ndjson": {
            "schema": {
                "type": "array",
                "items": _ref("Event"),
                "description": "Sent as NDJSON: one event object per line.",
            }
        },
    },
}

#: (path, method) -> the operation. tests/test_openapi.py holds this to ``app.ROUTES``.
OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("/v1/events", "post"): {
        "summary": "Send usage events: one, an array, or NDJSON; 202 once durable in JetStream.",
        "requestBody": _BODY_EVENTS,
        "responses": {
            **_ok(
                "Accepted: fsync'd in JetStream.",
                _obj(accepted=_INT, ids={"type": "array", "items": _STR}),
                202,
            ),
            "400": {
                "description": "Invalid events (nothing of the request kept): `details` lists every bad item.",
                "content": {
                    JSON: {
                        "schema": {
                            "allOf": [
                                _ref("Error"),
                                {"properties": {"details": {"type": "array", "items": _ref("ItemError")}}},
                            ]
                        }
                    }
                },
            },
            **_errors(401, 403, 413, 415, 429, 503),
        },
    },
    ("/v1/events/{event_id}", "get"): {
        "summary": "An event and its state: stored, quarantined (with reasons) or pending.",
        "parameters": [_p("event_id", "The event's id.")],
        "responses": {**_ok("The event.", _ref("StoredEvent")), **_errors(404, *_READ)},
    },
    ("/v1/meters", "get"): {
        "summary": "The meters of the catalog.",
        "responses": {
            **_ok("The meters.", _obj(meters={"type": "array", "items": _ref("Meter")})),
            **_errors(*_READ),
        },
    },
    ("/v1/meters/{slug}/usage", "get"): {
        "summary": "Usage of a meter over [from, to), by windows, grouped.",
        "parameters": [_p("slug", "The meter."), *_USAGE_PARAMS],
        "responses": {**_ok("The usage.", _ref("Usage")), **_errors(400, *_READ)},
    },
    ("/v1/quarantine", "get"): {
        "summary": "Quarantined events with their reasons, newest first.",
        "parameters": [
            _q("reason", "Only events quarantined for this reason."),
            _q("event_type", "Only this event type."),
            _q("customer_id", "Only this customer."),
            _q("from", "Received at or after (RFC 3339)."),
            _q("to", "Received before (RFC 3339)."),
            _q("status", "open, replayed or ... (see the README)."),
            *_PAGING,
        ],
        "responses": {**_ok("A page of quarantined events.", _ref("Page")), **_errors(400, *_READ)},
    },
    ("/v1/customers", "get"): {
        "summary": "Every customer by id, with subscriptions.",
        "parameters": _PAGING,
        "responses": {
            **_ok("The customers.", _obj(customers={"type": "array", "items": _ref("Customer")})),
            **_errors(*_ADMIN),
        },
    },
    ("/v1/customers/{customer_id}", "put"): {
        "summary": "Create or update a customer; with `plan`, subscribe at `subscribed_from`.",
        "parameters": [_CUSTOMER_ID],
        "requestBody": {"content": {JSON: {"schema": {"type": "object"}}}},
        "responses": {
            **_ok("Updated.", _ref("Customer")),
            **_ok("Created.", _ref("Customer"), 201),
            **_errors(*_ADMIN, 413),
        },
    },
    ("/v1/customers/{customer_id}", "get"): {
        "summary": "A customer and its subscriptions.",
        "parameters": [_CUSTOMER_ID],
        "responses": {**_ok("The customer.", _ref("Customer")), **_errors(404, *_ADMIN)},
    },
    ("/v1/customers/{customer_id}/subscriptions", "post"): {
        "summary": "Change a customer's plan at an instant.",
        "parameters": [_CUSTOMER_ID],
        "requestBody": {
            "required": True,
            "content": {JSON: {"schema": _obj(["plan"], plan=_STR, starts_at=_STR)}},
        },
        "responses": {**_ok("The customer.", _ref("Customer"), 201), **_errors(404, 413, *_ADMIN)},
    },
    ("/v1/invoices", "get"): {
        "summary": "Invoices, filtered.",
        "parameters": _INVOICE_FILTERS,
        "responses": {
            **_ok("The invoices.", _obj(invoices={"type": "array", "items": _ref("Invoice")})),
            **_errors(*_READ, 400),
        },
    },
    ("/v1/invoices.csv", "get"): {
        "summary": "One row per invoice line, for finance.",
        "parameters": _INVOICE_FILTERS,
        "responses": {**_ok("CSV.", _STR, media="text/csv"), **_errors(*_READ, 400)},
    },
    ("/v1/invoices/{invoice_id}.html", "get"): {
        "summary": "An invoice as a page to send or print.",
        "parameters": [_INVOICE_ID],
        "responses": {**_ok("HTML.", _STR, media="text/html"), **_errors(404, *_READ)},
    },
    ("/v1/invoices/{invoice_id}", "get"): {
        "summary": "An invoice and its lines.",
        "parameters": [_INVOICE_ID],
        "responses": {**_ok("The invoice.", _ref("Invoice")), **_errors(404, *_READ)},
    },
    ("/v1/keys", "get"): {
        "summary": "Every API key (never the secret).",
        "responses": {
            **_ok("The keys.", _obj(keys={"type": "array", "items": _ref("ApiKey")})),
            **_errors(*_ADMIN),
        },
    },
    ("/v1/keys", "post"): {
        "summary": "Create an API key; the secret is shown this once.",
        "requestBody": {
            "required": True,
            "content": {
                JSON: {
                    "schema": _obj(
                        ["scopes"],
                        scopes={"type": "array", "items": {"enum": ["ingest", "read", "admin"]}},
                        name=_STR,
                        customer_id=_STR,
                        events_per_second=_NUM,
                        requests_per_second=_NUM,
                    )
                }
            },
        },
        "responses": {**_ok("The new key.", _ref("ApiKey"), 201), **_errors(*_ADMIN, 413, 415)},
    },
    ("/v1/keys/{key_id}", "delete"): {
        "summary": "Revoke an API key.",
        "parameters": [_p("key_id", "The key's id.")],
        "responses": {**_ok("The revoked key.", _ref("ApiKey")), **_errors(404, *_ADMIN)},
    },
    ("/v1/audit", "get"): {
        "summary": "Administrative actions, newest first.",
        "parameters": _PAGING,
        "responses": {**_ok("A page of the audit log.", _ref("Page")), **_errors(*_ADMIN)},
    },
    ("/v1/ingest/status", "get"): {
        "summary": "Stream, consumer and ledger totals (processed = stored + duplicates + quarantined).",
        "responses": {
            **_ok("The totals; `degraded` names what did not answer.", _ref("IngestStatus")),
            **_errors(*_READ),
        },
    },
    ("/healthz", "get"): {
        "summary": "The process is up.",
        "security": [],
        "responses": _ok("Up.", _obj(status={"const": "ok"})),
    },
    ("/readyz", "get"): {
        "summary": "NATS, the stream and PostgreSQL answer and publishes are not failing.",
        "security": [],
        "responses": {
            **_ok("Ready.", _obj(status={"const": "ready"}, checks={"type": "object"})),
            **_errors(503),
        },
    },
    ("/openapi.json", "get"): {
        "summary": "This document.",
        "security": [],
        "responses": _ok("The OpenAPI document.", {"type": "object"}),
    },
    ("/docs", "get"): {
        "summary": "This document as a page to read.",
        "security": [],
        "responses": _ok("HTML.", _STR, media="text/html"),
    },
}


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the gateway."""
    paths: dict[str, dict[str, Any]] = {}
    for (path, method), operation in OPERATIONS.items():
        paths.setdefault(path, {})[method] = {"operationId": f"{method} {path}", **operation}
    # Route groups that describe their own operations (imported here: they import this module's helpers).
    from ingest_gateway import metrics, peers, webhooks

    for group in (webhooks.OPENAPI_PATHS, metrics.OPENAPI_PATHS, peers.openapi_paths()):
        for path, operations in group.items():
            for method, operation in operations.items():
                paths.setdefault(path, {})[method] = {"operationId": f"{method} {path}", **operation}
    responses = {
        f"E{code}": {"description": text, "content": {JSON: {"schema": _ref("Error")}}}
        for code, text in _ERROR_TEXT.items()
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "meter-platform gateway",
            "version": "1",
            "description": "Usage events in; usage, quarantine, customers and invoices out. Every error "
            'answer is {"error": "<one sentence>", "details": [...]}.',
        },
        "paths": paths,
        "components": {
            "schemas": _SCHEMAS,
            "responses": responses,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "An API key."}},
        },
        "security": [{"bearer": []}],
    }


async def openapi_json(request: Request) -> Response:
    """GET /openapi.json."""
    return json_response(document())


_DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>meter-platform gateway API</title>
<style>
body{font:15px/1.45 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
h2{margin-top:2rem;border-bottom:1px solid #ddd}.op{margin:1rem 0;padding:.5rem 1rem;border:1px solid #ddd;border-radius:6px}
.m{display:inline-block;min-width:4.5rem;font-weight:bold;text-transform:uppercase}code,pre{font-size:13px}
pre{background:#f6f6f6;padding:.5rem;overflow:auto}table{border-collapse:collapse}td,th{padding:2px 8px;text-align:left;vertical-align:top}
.lock{color:#a60}
</style></head><body>
<h1>meter-platform gateway API</h1>
<p>Rendered from <a href="/openapi.json">/openapi.json</a> (OpenAPI 3.1) by this page, with no outside assets.</p>
<div id="out">Loading&hellip;</div>
<script>
function esc(s){return String(s).replace(/[&<>"]/g,c=>({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]))}
function el(html){const d=document.createElement("div");d.innerHTML=html;return d}
fetch("/openapi.json").then(r=>r.json()).then(doc=>{
  const out=document.getElementById("out");out.innerHTML="";
  out.append(el("<p>"+esc(doc.info.description||"")+"</p>"));
  for(const [path,ops] of Object.entries(doc.paths)){
    for(const [method,op] of Object.entries(ops)){
      const secured=!(op.security&&op.security.length===0);
      let h="<div class=op><div><span class=m>"+esc(method)+"</span> <code>"+esc(path)+"</code> "+
        (secured?"<span class=lock>(API key)</span>":"(public)")+"</div><p>"+esc(op.summary||"")+"</p>";
      if(op.parameters&&op.parameters.length){
        h+="<table><tr><th>parameter</th><th>in</th><th>schema</th><th></th></tr>";
        for(const p of op.parameters) h+="<tr><td><code>"+esc(p.name)+"</code>"+(p.required?" *":"")+"</td><td>"+
          esc(p.in)+"</td><td><code>"+esc(JSON.stringify(p.schema))+"</code></td><td>"+esc(p.description||"")+"</td></tr>";
        h+="</table>";
      }
      if(op.requestBody) for(const [t,c] of Object.entries(op.requestBody.content))
        h+="<p>body <code>"+esc(t)+"</code></p><pre>"+esc(JSON.stringify(c.schema,null,1))+"</pre>";
      h+="<table>";
      for(const [code,r] of Object.entries(op.responses)){
        const ref=r.$ref?r.$ref.split("/").pop():null, resp=ref?doc.components.responses[ref]:r;
        const media=resp.content?Object.keys(resp.content).join(", "):"";
        h+="<tr><td><b>"+esc(code)+"</b></td><td>"+esc(resp.description)+"</td><td><code>"+esc(media)+"</code></td></tr>";
      }
      out.append(el(h+"</table></div>"));
    }
  }
  let s="<h2>Schemas</h2>";
  for(const [name,schema] of Object.entries(doc.components.schemas))
    s+="<h3 id='"+esc(name)+"'>"+esc(name)+"</h3><pre>"+esc(JSON.stringify(schema,null,1))+"</pre>";
  out.append(el(s));
}).catch(e=>{document.getElementById("out").textContent="Could not load /openapi.json: "+e});
</script></body></html>
"""


async def docs_page(request: Request) -> Response:
    """GET /docs: a page that renders /openapi.json with plain JavaScript (no CDN)."""
    return HTMLResponse(_DOCS_PAGE)
