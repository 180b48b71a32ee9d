"""PLC connectors (one folder per protocol) that turn PLC values into Samples."""
