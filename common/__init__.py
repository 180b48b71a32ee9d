"""Shared infrastructure of the edge agent and the cloud: logs, durations, key files, retry, MQTT.

Every package of ours may import `common`; `common` imports no other package of ours. It holds
what both processes need and no domain knowledge: the OEE model lives in `oee/`, the wire
contract in `sync/`.

- `common.logs`: the structlog set-up of both CLIs (JSON lines on stderr).
- `common.duration`: the one duration grammar of every YAML and CLI duration.
- `common.keydir`: key directories and key files (0700 directories, 0600 private files,
  atomic writes, `<kind>-<kid>.key` rings with a `<kind>.current` pointer).
- `common.retry`: the one backoff policy (capped exponential, optional jitter).
- `common.mqtt`: the paho client both sides use (settings, TLS, subscribe on every connect,
  the network thread's start and stop).
- `common.memory`: freed heap pages back to the kernel after start-up and reloads.
"""
