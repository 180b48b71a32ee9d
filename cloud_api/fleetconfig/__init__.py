"""Remote configuration of agents: versions in PostgreSQL, signed and published to each agent.

`store` keeps the versions and what each agent reported, `publish` signs and publishes the
current version, `routes` serves `/v1/agents/{id}/config` (mounted by `create_app`) and `cli`
adds `cloud-api agents config`. Ingest records the agents' reports through `store`."""
