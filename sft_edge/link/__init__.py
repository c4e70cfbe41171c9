"""The link to the daemon: credentials, the routing key, transports (gRPC or in-process)."""
