"""Joining a Ray cluster (``--address``) or starting a light local Ray instance, for sweeps and experiments.

Since Ray 2.5x, ``ray start --head`` turns on token authentication when a token exists
(``~/.ray/auth_token``, ``RAY_AUTH_TOKEN_PATH`` or ``RAY_AUTH_TOKEN``), and a driver given an explicit
address sends its token only with ``RAY_AUTH_MODE=token`` (``--address auto`` on the head node finds it
by itself). Without it Ray retries for about 20 seconds and fails with a chain of tracebacks; this module
turns that, and any other failure to connect, into one :class:`~ilm_dist.errors.InputError` saying what
to do.
"""

from __future__ import annotations

import socket

from ilm_dist.errors import InputError

OBJECT_STORE_BYTES = 256 * 2**20  # trials and cells exchange small dicts; keep a local Ray light
ANSWER_TIMEOUT_S = 10  # ray.init retries a closed address for minutes before it fails


def init_ray(address: str | None, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Join the cluster at ``address``, else start a local Ray instance without a dashboard."""
    import ray

    if not address:
        ray.init(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=False,
            object_store_memory=OBJECT_STORE_BYTES,
        )
        return
    if num_cpus is not None or num_gpus is not None:
        raise InputError(
            f"--address {address}: --num-cpus/--num-gpus size a local Ray instance; a cluster has its own"
        )
    check_something_answers(address)
    try:
        ray.init(address=address)
    except (ConnectionError, RuntimeError) as err:
        raise InputError(connection_error(address, err)) from None


def check_something_answers(address: str) -> None:
    """A ``host:port`` address where nothing accepts a connection is refused at once, in one line
    (``ray.init`` would retry it for minutes); ``auto`` and ``ray://`` addresses are left to Ray."""
    host, _, port = address.rpartition(":")
    if address == "auto" or "://" in address or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=ANSWER_TIMEOUT_S).close()
    except OSError as err:
        raise InputError(
            f"--address {address}: nothing answers there ({err.strerror or err}); start a cluster with "
            "`ray start --head` and pass the address it prints"
        ) from None


def connection_error(address: str, err: BaseException) -> str:
    """One line on why ``ray.init(address)`` failed, and what to do."""
    chain, cause = [], err
    while cause is not None:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any(type(e).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(e) for e in chain):
        return (
            f"--address {address}: the Ray cluster refused the connection: it uses token authentication and "
            "this process sent no token; set RAY_AUTH_MODE=token (the token is read from RAY_AUTH_TOKEN, "
            "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, as on the cluster), or use --address auto on the head node"
        )
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return (
        f"--address {address}: cannot join a Ray cluster there ({first}); start one with "
        "`ray start --head` and pass the address it prints"
    )
