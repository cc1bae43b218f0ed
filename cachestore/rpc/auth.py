"""Who may call the store, and on what: bearer tokens and their scopes; and BearerAuth, the
bearer-token interceptor that the store's server and the worker's gRPC service both use.

Two kinds of token:
- the internal token (`--token`): the deployment's own parts (workers, routers, other stores).
  Every RPC, every namespace, read and write.
- client tokens (`--token-file`): each bound to one tenant, read-only or read-write. A client
  call's namespace gets that tenant's salt, derived here from the store's tenant secret (the same
  derivation as the router's, so a tenant's pages are shared between its HTTP traffic and its
  direct store calls); the salt in the request body is ignored. Client tokens may use only the
  namespace RPCs (Put, GetClosest, Lookup, Delete, Stats): the page-key RPCs name pages by key,
  and a key does not say whose page it is.

The token file is JSON: `{"tokens": [{"token": "...", "tenant": "alice", "access": "read"}]}`
(`access`: "read" or "read-write").
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import xxhash

from kvmesh.cachestore.errors import Forbidden, InvalidConfig
from kvmesh.cachestore.keys import Namespace

MAX_TOKENS = 100_000


def tenant_salt(secret: str, tenant: str) -> str:
    """A tenant's namespace salt: xxh3_128 hex of the deployment secret and the tenant name;
    '' for no tenant (no auth). Routers and stores derive it the same way."""
    if not tenant:
        return ""
    return xxhash.xxh3_128_hexdigest(f"{secret}\0{tenant}".encode())


@dataclass(frozen=True)
class Scope:
    """What one token allows. `tenant` None: every namespace (the internal token)."""

    tenant: str | None
    can_write: bool
    salt: str = ""  # the tenant's salt (client tokens only)

    @property
    def is_internal(self) -> bool:
        return self.tenant is None


INTERNAL = Scope(tenant=None, can_write=True)


def scoped_namespace(ns: Namespace, scope: Scope, *, write: bool) -> Namespace:
    """The namespace a call of `scope` may touch: a client token's own tenant's, whatever the
    request says (its salt is replaced). Raises Forbidden for a write with a read-only token."""
    if scope.is_internal:
        return ns
    if write and not scope.can_write:
        raise Forbidden(f"this token may only read (tenant {scope.tenant!r})")
    return ns.with_salt(scope.salt)


class TokenTable:
    """The tokens a store accepts. Empty: no auth, every caller is internal."""

    def __init__(self, internal_token: str | None = None,
                 clients: dict[str, Scope] | None = None) -> None:
        self._internal = internal_token.encode() if internal_token else None
        self._clients = {token.encode(): scope for token, scope in (clients or {}).items()}

    @classmethod
    def from_config(cls, internal_token: str | None, token_file: str | None,
                    tenant_secret: str | None) -> TokenTable:
        if token_file is None or not tenant_secret:  # StoreConfig requires both or neither
            return cls(internal_token)
        return cls(internal_token, _read_token_file(token_file, tenant_secret))

    @property
    def is_enabled(self) -> bool:
        return self._internal is not None or bool(self._clients)

    def scope_of(self, authorization: str | bytes | None) -> Scope | None:
        """The scope of an `authorization: Bearer <token>` value; None if it is not accepted."""
        if not self.is_enabled:
            return INTERNAL
        if not authorization:
            return None
        given = authorization.encode() if isinstance(authorization, str) else authorization
        if not given.startswith(b"Bearer "):
            return None
        token = given[len(b"Bearer "):]
        if self._internal is not None and hmac.compare_digest(token, self._internal):
            return INTERNAL
        return self._clients.get(token)  # a dict probe: its timing reveals only a hash bucket


def _read_token_file(path: str, tenant_secret: str) -> dict[str, Scope]:
    try:
        data = json.loads(Path(path).read_text())
        entries = data["tokens"]
        if not isinstance(entries, list) or len(entries) > MAX_TOKENS:
            raise ValueError(f"'tokens' must be a list of at most {MAX_TOKENS}")
        clients: dict[str, Scope] = {}
        for entry in entries:
            token, tenant, access = entry["token"], entry["tenant"], entry.get("access", "read")
            if not isinstance(token, str) or len(token) < 16:
                raise ValueError("every token must be a string of at least 16 characters")
            if not isinstance(tenant, str) or not tenant:
                raise ValueError("every token needs a non-empty tenant")
            if access not in ("read", "read-write"):
                raise ValueError(f"access must be 'read' or 'read-write', got {access!r}")
            if token in clients:
                raise ValueError("a token is listed twice")
            salt = tenant_salt(tenant_secret, tenant)
            clients[token] = Scope(tenant, access == "read-write", salt)
        return clients
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidConfig(f"token file {path!r}: {exc}") from None


# Calls that need no token: orchestrators probe health without one.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


class BearerAuth(grpc.ServerInterceptor):
    """The one bearer-token check of kvmesh's gRPC servers (the store's and the worker's). Every
    call but health checks must carry `authorization: Bearer <token>` with a token `tokens`
    accepts, else it ends UNAUTHENTICATED before its handler runs (a call to a method the server
    does not have, too: a caller without a token learns nothing about what is served). What an
    accepted token may do is the servicer's to check (the store's scopes:
    `KVStoreServicer._scope`; a worker accepts only the internal token: `BearerAuth.internal`)."""

    def __init__(self, tokens: TokenTable) -> None:
        self._tokens = tokens

    @classmethod
    def internal(cls, token: str) -> BearerAuth:
        """Accept only the deployment's internal token (a worker's service)."""
        return cls(TokenTable(token))

    def intercept_service(self, continuation, handler_call_details):
        return self.gate(continuation(handler_call_details), handler_call_details)

    def gate(self, handler: Any, handler_call_details: Any, *, is_async: bool = False) -> Any:
        """`handler` if the call may run, else one that ends it UNAUTHENTICATED (a coroutine
        for a grpc.aio server, whose sync handlers' abort may not run on its event loop)."""
        if handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization")
        if self._tokens.scope_of(given) is not None:
            return handler
        return _denied(handler, "missing authorization" if not given else "wrong bearer token",
                       is_async)


class AioBearerAuth(grpc.aio.ServerInterceptor):
    """BearerAuth for a grpc.aio server (the worker's `--grpc-server aio`): the same check."""

    def __init__(self, auth: BearerAuth) -> None:
        self._auth = auth

    async def intercept_service(self, continuation, handler_call_details):
        return self._auth.gate(await continuation(handler_call_details), handler_call_details,
                               is_async=True)


def _denied(handler: grpc.RpcMethodHandler | None, message: str,
            is_async: bool = False) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` (unary when there is none) that only aborts."""

    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_async(request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kind = (False, False) if handler is None else (handler.request_streaming,
                                                   handler.response_streaming)
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[kind]
    return make(deny_async if is_async else deny)
