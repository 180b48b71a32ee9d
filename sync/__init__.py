"""The edge-cloud contract: envelope sealing and opening, the MQTT uplink and the ack protocol."""
