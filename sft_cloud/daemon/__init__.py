"""The daemon: server factory, servicer, stream protocol, auth, leases, metrics, launch."""
