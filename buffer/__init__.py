"""The durable SQLite outbox of sealed batches, committed with the engine checkpoint."""
