"""Reaching Ray: start an embedded instance or join a cluster, within a bounded wait and with one-line errors.

The one place where distq calls ray.init (training with Ray actors and Tune sweeps both come here). Ray itself waits
without limit, or for minutes, in several places a user meets first: an address where nothing listens, a stale
`ray_current_cluster` file after a head died, actors that the cluster has no room for. Each of those is turned into
a wait of at most `timeout_s` followed by one line that names what was asked and what to change.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional, Sequence

import ray

from distq.errors import DistqError
from distq.setup.machine import worker_env


def connect_ray(address: Optional[str], timeout_s: float, num_cpus: Optional[int] = None,
                quiet: bool = True) -> bool:
    """Join `address` ('auto', host:port, or None for RAY_ADDRESS) or, with neither, start an embedded instance of
    `num_cpus` CPUs; nothing if Ray is already up in this process. True if this call ran ray.init (the caller then
    shuts Ray down). `quiet`: the actors' output and Ray's info lines stay off the driver's console (they would
    break its progress line)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    options = {"log_to_driver": False, "logging_level": logging.ERROR} if quiet else {}
    options["runtime_env"] = {"env_vars": worker_env()}
    if address in (None, "local"):
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **options)
        except Exception as err:  # Ray raises many types when its processes do not come up
            raise DistqError(f"could not start an embedded Ray instance: {_first_line(err)} (is /tmp full, or "
                             "another Ray using all ports? an existing cluster can be joined with --address auto)"
                             ) from None
        return True
    host, port = _resolve(address)
    _wait_for_listener(address, host, port, timeout_s)
    try:
        ray.init(address=address, **options)  # 'auto' as such: Ray then sends this machine's token
    except Exception as err:
        raise DistqError(_join_failure(address, err)) from None
    return True


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _resolve(address: str) -> tuple[str, int]:
    """host and port of the cluster's GCS; 'auto' is looked up as Ray does (RAY_ADDRESS, then the address that the
    last `ray start --head` on this machine recorded)."""
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            address = canonicalize_bootstrap_address("auto")
        except (ConnectionError, ValueError) as err:
            raise DistqError(f"--address auto: no running Ray cluster found on this machine ({_first_line(err)}); "
                             "start one with `ray start --head`, or pass --address HOST:PORT") from None
    if address.startswith("ray://"):
        raise DistqError(f"--address {address}: Ray Client addresses are not supported; run distq on a node of the "
                         "cluster with --address auto, or use `ray submit`")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DistqError(f"--address {address!r} must be 'auto' or HOST:PORT (the head's GCS port, 6379 by default)")
    return host, int(port)


def _wait_for_listener(address: str, host: str, port: int, timeout_s: float) -> None:
    """Return once something accepts TCP connections at host:port; DistqError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(min(5.0, deadline - time.monotonic()), 0.1)):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise DistqError(
                    f"no Ray cluster answers at {host}:{port} (address {address!r}) after {timeout_s:g} s "
                    f"(parallel.connect_timeout_s): {err.strerror or err}; start a head there with `ray start "
                    "--head`, or check the address (`ray status` on the head prints it)") from None
        time.sleep(0.5)


def _token_path() -> Optional[Path]:
    """Where Ray reads the cluster's token on this machine, if a token is there."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return Path("$RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path if path.is_file() else None


def _join_failure(address: str, err: BaseException) -> str:
    text = str(err)
    # Ray sends this machine's token only to a cluster it found itself ('auto'), never to an explicit address
    if isinstance(err, ray.exceptions.AuthenticationError) or "Unauthenticated" in text or "InvalidAuthToken" in text:
        token = _token_path()
        where = f"this machine has a token at {token}" if token else (
            "no token was found on this machine (~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)")
        return (f"the Ray cluster at {address} refused the connection: token authentication failed; set "
                f"RAY_AUTH_MODE=token and give this machine the head's token (the head keeps it in ~/.ray/auth_token; "
                f"copy it, or set RAY_AUTH_TOKEN); {where}")
    return f"could not join the Ray cluster at {address}: {_first_line(err)}"


def wait_placed(refs: Sequence, timeout_s: float, asked: str) -> list:
    """ray.get of the actors' first calls, failing after timeout_s with what was asked and what the cluster has
    (an actor that cannot be placed would otherwise wait forever)."""
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    if pending:
        total, free = ray.cluster_resources(), ray.available_resources()
        have = ", ".join(f"{total.get(key, 0):g} {key} ({free.get(key, 0):g} free)" for key in ("CPU", "GPU"))
        raise DistqError(f"after {timeout_s:g} s (parallel.connect_timeout_s) {len(pending)} of {len(refs)} actors "
                         f"are not up (waiting for resources, or still starting): asked {asked}; the cluster has {have}; lower "
                         "parallel.workers, parallel.num_cpus_per_worker, parallel.learner_num_cpus or the GPU and "
                         "memory fields, or add nodes")
    return ready
