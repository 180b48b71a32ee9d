"""The cloud side: ingest worker, PostgreSQL schema and migrations, HTTP API and dashboard."""
