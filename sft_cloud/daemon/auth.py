"""Who may use the daemon: TLS server credentials, bearer tokens, and each caller's identity.

- ``server_credentials``: TLS (mutual when ``--tls-client-ca``), or None for ``--insecure``.
- ``TokenInterceptor``: checks the bearer token of every call before the handler runs, so a
  refused edge never gets a single payload read; health checks are exempt (the container
  healthcheck has no token, and the answer says nothing but SERVING).
- ``identity``: what a session is bound to, derived from the token and the client certificate.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import ssl
from typing import Callable, Iterable, List, Optional

import grpc

from sft_cloud.daemon.config import check_tls_flags
from sft_common.security.pem import read_pem
from sft_common.security.tokens import bearer_token, read_token_file

log = logging.getLogger("sft_cloud")
HEALTH_PREFIX = "/grpc.health.v1.Health/"


def server_credentials(
    insecure: bool, tls_cert: Optional[str], tls_key: Optional[str], tls_client_ca: Optional[str]
) -> Optional[grpc.ServerCredentials]:
    """TLS credentials from the PEM files, or None when plaintext was asked for explicitly."""
    check_tls_flags(insecure, tls_cert, tls_key, tls_client_ca)
    if insecure or tls_cert is None or tls_key is None:
        return None
    pair = (read_pem(tls_key, "--tls-key"), read_pem(tls_cert, "--tls-cert"))
    client_ca = read_pem(tls_client_ca, "--tls-client-ca") if tls_client_ca else None
    # With a client CA the handshake itself refuses edges without a certificate it signed.
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


class TokenSet:
    """The accepted bearer tokens, kept as SHA-256 digests and compared in constant time."""

    def __init__(self, tokens: Iterable[str]):
        self._digests: List[bytes] = [hashlib.sha256(t.encode()).digest() for t in tokens]

    @classmethod
    def from_file(cls, path: str) -> TokenSet:
        return cls(read_token_file(path))

    def __len__(self) -> int:
        return len(self._digests)

    def accepts(self, token: str) -> bool:
        digest = hashlib.sha256(token.encode()).digest()
        ok = False
        for known in self._digests:  # no early exit: the time does not depend on which one matched
            ok |= hmac.compare_digest(known, digest)
        return ok


def token_refusal(tokens: TokenSet, metadata) -> Optional[str]:
    """Why the call's metadata is refused, or None if it carries an accepted token."""
    token = bearer_token(metadata)
    if token is None:
        return "no bearer token: this daemon requires one (sft-edge --auth-token-file)"
    if not token:
        return "the authorization metadata is not of the form 'Bearer <token>'"
    if not tokens.accepts(token):
        return "the bearer token is not one this daemon accepts (check --auth-token-file on both sides)"
    return None


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, every call but health checks that lacks an accepted token."""

    def __init__(self, tokens: TokenSet):
        self.tokens = tokens

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        reason = token_refusal(self.tokens, handler_call_details.invocation_metadata)
        if reason is None:
            return handler
        log.warning("refused %s: %s", handler_call_details.method, reason)
        return _refusing(handler, reason)


def _refusing(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that aborts without reading the request stream."""

    def abort(request_or_iterator, context: grpc.ServicerContext):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    kinds: dict = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make: Callable = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        abort,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def identity(context: grpc.ServicerContext) -> str:
    """What a session is bound to: the caller's token and/or client certificate, hashed.

    ``token:<sha256>`` when the call carries a bearer token, ``cert:<sha256 of the DER>`` under
    mutual TLS, both joined with ``+`` when both are present, ``anonymous`` otherwise. A
    renewed certificate is a new identity (sessions are short-lived; a resume after renewal
    opens a new session).
    """
    parts = []
    token = bearer_token(context.invocation_metadata())
    if token:
        parts.append("token:" + hashlib.sha256(token.encode()).hexdigest()[:32])
    pems = (context.auth_context() or {}).get("x509_pem_cert")
    if pems:
        der = ssl.PEM_cert_to_DER_cert(pems[0].decode("ascii"))
        parts.append("cert:" + hashlib.sha256(der).hexdigest()[:32])
    return "+".join(parts) or "anonymous"
