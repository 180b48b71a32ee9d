"""The cloud side: stores what agents send and serves it over HTTP.

Three subpackages, one job each, and the shared modules they use:

    ingest/   the ingest worker: verify, open and store sealed batches exactly once, ack them
    access/   who may call the API and see what: tokens, API keys, roles, rate limits,
              personal data, audit, revocations, the security middlewares
    api/      the HTTP query API: create_app, routes, queries, caches, serving, dashboard

    config.py, db.py (and migrations/), problems.py, metrics.py, tracing.py: shared;
    cli.py and asgi.py: the entry points.

Imports point one way: api -> access, ingest -> shared modules; access and ingest never
import api, and the shared modules import no subpackage (tests/test_import_layout.py).
"""
