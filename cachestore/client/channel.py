"""A StoreClient's gRPC channel: plain or TLS, with the message-size options of wire.py."""

from __future__ import annotations

from pathlib import Path

import grpc

from kvmesh.cachestore.rpc import wire


def open_channel(target: str, tls: bool | str | bytes) -> grpc.Channel:
    """tls: False (plain), True (system roots), or the CA certificate (PEM bytes or a path)."""
    options = wire.CLIENT_OPTIONS
    if tls is False:
        return grpc.insecure_channel(target, options=options)
    if tls is True:
        credentials = grpc.ssl_channel_credentials()
    else:
        root = tls if isinstance(tls, bytes) else Path(tls).read_bytes()
        credentials = grpc.ssl_channel_credentials(root_certificates=root)
    return grpc.secure_channel(target, credentials, options=options)
