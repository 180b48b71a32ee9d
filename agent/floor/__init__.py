"""Serves the agent's live numbers to the plant floor: an OPC UA server and a Sparkplug B
edge node (or plain unified-namespace JSON) on the plant's own MQTT broker."""
