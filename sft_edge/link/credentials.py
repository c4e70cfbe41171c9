"""What the edge presents to the daemon and trusts: TLS channel credentials, its bearer token,
and a first connection that says *why* a secure connection failed.

gRPC reports a failed TLS handshake only as UNAVAILABLE and keeps retrying; without
``check_connection`` a wrong CA or an expired certificate would look like a daemon that is
not there. A fail-fast health check reads the handshake error and turns it into advice.
"""

from __future__ import annotations

import logging
import re
import time
from typing import List, Optional, Tuple

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sft_common.security.pem import read_pem
from sft_common.security.tokens import TokenError, bearer_metadata, read_token_file
from sft_edge.link.transport import CloudError

log = logging.getLogger("sft_edge")


def channel_credentials(
    insecure: bool, tls_ca: Optional[str], tls_cert: Optional[str] = None, tls_key: Optional[str] = None
) -> Optional[grpc.ChannelCredentials]:
    """TLS credentials from the PEM files (mutual TLS with a client pair), or None for plaintext,
    which must be asked for with ``insecure``."""
    if insecure:
        if tls_ca or tls_cert or tls_key:
            raise ValueError("--insecure and --tls-ca/--tls-cert/--tls-key exclude each other")
        return None
    if not tls_ca:
        # No silent fallback to the system roots: the daemon's CA is named explicitly (a public
        # one can be given as the system bundle, e.g. /etc/ssl/certs/ca-certificates.crt).
        raise ValueError(
            "no TLS material: pass --tls-ca (the CA that signed the daemon's certificate; "
            "`make certs` writes certs/dev/ca.pem), or --insecure to connect in plaintext"
        )
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("mutual TLS needs both --tls-cert and --tls-key")
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(tls_ca, "--tls-ca"),
        private_key=read_pem(tls_key, "--tls-key") if tls_key else None,
        certificate_chain=read_pem(tls_cert, "--tls-cert") if tls_cert else None,
    )


def auth_metadata(token_file: Optional[str]) -> List[Tuple[str, str]]:
    """``[("authorization", "Bearer <token>")]`` from the token file, or nothing without one."""
    if not token_file:
        return []
    tokens = read_token_file(token_file)
    if len(tokens) != 1:
        raise TokenError(
            f"--auth-token-file {token_file} holds {len(tokens)} tokens; the edge sends exactly one"
        )
    return [bearer_metadata(tokens[0])]


def secure_link(
    target: str,
    insecure: bool,
    tls_ca: Optional[str],
    tls_cert: Optional[str],
    tls_key: Optional[str],
    token_file: Optional[str],
) -> Tuple[Optional[grpc.ChannelCredentials], List[Tuple[str, str]]]:
    """The channel credentials and call metadata for ``sft-edge``'s flags, once the daemon has
    answered over them (``check_connection``); raises ValueError or CloudError saying why not."""
    creds = channel_credentials(insecure, tls_ca, tls_cert, tls_key)
    metadata = auth_metadata(token_file)
    if creds is None:
        log.warning(
            "connecting WITHOUT TLS (--insecure) to %s%s",
            target,
            ": the bearer token crosses in clear" if metadata else "",
        )
    check_connection(target, creds, client_cert=tls_cert is not None)
    return creds, metadata


def explain(details: str, target: str, tls: bool, client_cert: bool) -> Optional[str]:
    """Advice for a connection failure gRPC described as ``details``, or None if the daemon
    may simply not be up yet (worth waiting for)."""
    if "Connection refused" in details:
        return None
    if "WRONG_VERSION_NUMBER" in details:
        return f"the daemon at {target} does not speak TLS (does it run with --insecure?)"
    if "Hostname Verification" in details or "Peer name" in details:
        return (
            f"the daemon's certificate is not issued for {target.rsplit(':', 1)[0]}: "
            "its subject alternative names do not include the host this edge connects to"
        )
    verify = re.search(r"CERTIFICATE_VERIFY_FAILED:?\s*([^:]*)", details)
    if verify:
        reason = verify.group(1).strip() or "verification failed"
        if "expired" in reason:
            return f"the daemon's certificate has expired ({reason}); it must be renewed"
        return (
            f"the daemon's certificate does not verify against --tls-ca ({reason}); "
            "is --tls-ca the CA that signed it?"
        )
    if "Socket closed" in details or "Connection reset" in details:
        if not tls:
            return (
                f"the daemon at {target} closed a plaintext connection: it serves TLS; "
                "connect with --tls-ca instead of --insecure"
            )
        if client_cert:
            return (
                f"the daemon at {target} closed the connection during the TLS handshake: it requires "
                "mutual TLS and refused this edge's client certificate (not signed by the CA it trusts)"
            )
        return (
            f"the daemon at {target} closed the connection during the TLS handshake: it requires "
            "mutual TLS; pass a client certificate with --tls-cert and --tls-key"
        )
    if "handshake" in details.lower():
        return f"TLS handshake with {target} failed: {details}"
    return None


def unresolvable(details: str) -> bool:
    """Whether gRPC's failure text says the host name does not resolve (wording varies by version)."""
    return any(
        words in details
        for words in (
            "DNS resolution failed",
            "Domain name not found",
            "Name or service not known",
            "errors resolving",
        )
    )


def check_connection(
    target: str,
    credentials: Optional[grpc.ChannelCredentials],
    client_cert: bool = False,
    timeout: float = 30.0,
) -> None:
    """Wait up to ``timeout`` for the daemon to answer a health check over these credentials;
    raise CloudError(UNAVAILABLE) at once, with the reason, when the TLS setup is wrong."""
    if credentials is None:
        channel = grpc.insecure_channel(target)
    else:
        channel = grpc.secure_channel(target, credentials)
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    closed_before = False
    next_note = time.monotonic() + 2.0
    try:
        while True:
            remaining = deadline - time.monotonic()
            try:
                # Fail fast (no wait_for_ready): a refused handshake comes back with its reason.
                stub.Check(health_pb2.HealthCheckRequest(), timeout=max(remaining, 1.0))
                return
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
            if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return  # the transport works; the session stream reports anything else
            if unresolvable(details):  # no reason to wait: the name will not resolve later
                raise CloudError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"cannot resolve the host in --cloud {target}: check the name (CLOUD_HOST in the README "
                    "is a placeholder for your daemon's address)",
                    local=True,
                )
            why = explain(details, target, credentials is not None, client_cert)
            # A closed socket can be a restart in progress: believe it the second time in a row.
            closed = "Socket closed" in details or "Connection reset" in details
            if why is not None and (not closed or closed_before):
                raise CloudError(grpc.StatusCode.UNAVAILABLE, why, local=True)
            closed_before = closed
            if time.monotonic() >= deadline:
                raise CloudError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"no sft-cloud daemon answered at {target} within {timeout:.0f}s ({details})",
                    local=True,
                )
            if time.monotonic() >= next_note:  # a visible countdown while the daemon may be starting
                reason = "connection refused" if "refused" in details else details
                log.info(
                    "no sft-cloud daemon answers at %s yet (%s); trying for another %.0fs",
                    target,
                    reason,
                    deadline - time.monotonic(),
                )
                next_note = time.monotonic() + 5.0
            time.sleep(0.2 if closed else 0.5)
    finally:
        channel.close()
