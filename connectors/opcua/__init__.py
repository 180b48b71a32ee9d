"""OPC UA connector: config model, hub (subscriptions or batched reads), browse, simulator."""
