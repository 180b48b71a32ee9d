"""The ingest worker: verifies, opens and stores sealed batches exactly once, and acks them."""
