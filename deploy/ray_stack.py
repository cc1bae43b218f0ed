"""Bring the kvmesh stack up on a Ray cluster, list it, take it down.

Layout on the cluster:
- `kvmesh-store`: pinned to the head node, fixed port, restarted by Ray on failure.
- `kvmesh-worker-<i>` (or, disaggregated, `kvmesh-prefill-worker-<i>` then
  `kvmesh-decode-worker-<i>`, each run with its `--role`): worker k is bundle k of the detached
  SPREAD placement group `kvmesh-workers` (one bundle per worker: its CPUs/GPU), port
  `worker_base_port + k`. A bundle stays on its node, so a
  worker restarted by Ray comes back at the same host:port and the router, which keeps dialing
  the address it was given, picks it up again when its KvEvents stream resumes.
- `kvmesh-router`: pinned to the head node, fixed port; given every worker's address (with
  `--prefill-worker` / `--decode-worker` for disaggregated ones).
All are detached actors in one Ray namespace, so they outlive the `kvmesh ray deploy` driver.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass

import ray
from ray.util.placement_group import (
    get_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

from kvmesh.deploy.errors import DeployError
from kvmesh.deploy.ray_actors import RemoteRoleActor, RoleInfo, start_error, wait_ready
from kvmesh.deploy.ray_config import (
    ACTOR_PREFIX,
    ROUTER_ACTOR,
    STORE_ACTOR,
    WORKER_GROUP,
    RayDeployConfig,
)

_HEAD_RESOURCE = "node:__internal_head__"


@dataclass(frozen=True)
class StackStatus:
    infos: dict[str, RoleInfo]  # actor name -> info, for actors that answered
    unavailable: list[str]  # actor names that did not answer (restarting, or dead)

    @property
    def router_url(self) -> str | None:
        router = self.infos.get(ROUTER_ACTOR)
        return None if router is None else f"http://{router.address}"


def connect(address: str, namespace: str, timeout_s: float = 10.0) -> None:
    """Join the cluster as a driver. Raises DeployError at once when it cannot be reached
    (ray.init alone retries an unreachable GCS forever)."""
    if ray.is_initialized():
        return
    target = address.removeprefix("ray://")
    if address != "auto" and ":" in target:
        host, _, port = target.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=timeout_s).close()
        except (OSError, ValueError) as exc:
            raise DeployError(f"cannot reach the Ray cluster at {address}: {exc}") from exc
    # deploy reports the first role that failed; Ray would also print every other failed
    # info() call, with tracebacks, when its result is dropped
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    try:
        ray.init(address=address, namespace=namespace, log_to_driver=False,
                 logging_level=logging.WARNING)
    except ConnectionError as exc:
        raise DeployError(f"cannot connect to the Ray cluster at {address}: {exc}") from exc


def _head_node_id() -> str:
    nodes = [node for node in ray.nodes() if node["Alive"]]
    for node in nodes:
        if _HEAD_RESOURCE in node["Resources"]:
            return node["NodeID"]
    return ray.get_runtime_context().get_node_id()


def _on_head(head_node_id: str) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node_id=head_node_id, soft=False)


def _start(name: str, role: str, argv: list[str], config: RayDeployConfig,
           **options: object) -> ray.actor.ActorHandle:
    return RemoteRoleActor.options(  # type: ignore[return-value]
        name=name, namespace=config.namespace, lifetime="detached",
        max_restarts=config.max_restarts, max_task_retries=-1, **options,
    ).remote(role, argv, config.ready_timeout_s, config.role_env(role))


def _ready(handles: list[ray.actor.ActorHandle], what: str, timeout_s: float) -> list[RoleInfo]:
    try:
        return wait_ready(handles, timeout_s)
    except ray.exceptions.GetTimeoutError as exc:
        raise DeployError(f"{what} not ready after {timeout_s:.0f}s") from exc
    except ray.exceptions.RayActorError as exc:
        raise DeployError(f"{what} failed to start: {start_error(exc)}") from exc


def _kvmesh_actor_names() -> list[str]:
    return sorted(n for n in ray.util.list_named_actors() if n.startswith(ACTOR_PREFIX))


def deploy(config: RayDeployConfig) -> StackStatus:
    """Start store, workers and router; returns once all are listening. Raises DeployError
    (after removing what it started) when the stack cannot come up."""
    connect(config.address, config.namespace)
    if _kvmesh_actor_names():
        raise DeployError(f"kvmesh is already deployed in namespace {config.namespace!r}; "
                          "run `kvmesh ray down` first")
    try:
        return _deploy(config)
    except BaseException:
        down(is_graceful=False)  # roles still starting cannot take a stop call
        raise


def _node_ips() -> dict[str, str]:
    return {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]}


def _deploy(config: RayDeployConfig) -> StackStatus:
    # Every address is known before anything starts (fixed ports; the store and router on the
    # head node, worker i on the node of bundle i), so all roles start at once: the workers'
    # store client and the router's worker pool connect when their peers come up.
    head = _head_node_id()
    worker_names = config.worker_actor_names
    num_workers = len(worker_names)
    bundle = {"CPU": config.num_cpus_per_worker, "GPU": config.num_gpus_per_worker}
    bundle = {k: v for k, v in bundle.items() if v > 0}
    group = placement_group([bundle] * num_workers, strategy="SPREAD",
                            name=WORKER_GROUP, lifetime="detached")
    try:
        ray.get(group.ready(), timeout=config.ready_timeout_s)
    except ray.exceptions.GetTimeoutError as exc:
        free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        raise DeployError(f"the cluster cannot place {num_workers} workers of {bundle} "
                          f"each within {config.ready_timeout_s:.0f}s; free now: {free}") from exc
    node_ips = _node_ips()
    bundle_nodes = placement_group_table(group)["bundles_to_node_id"]
    store_address = f"{node_ips[head]}:{config.store_port}"
    worker_addresses = [f"{node_ips[bundle_nodes[i]]}:{config.worker_port(i)}"
                        for i in range(num_workers)]

    store = _start(STORE_ACTOR, "store", config.store_argv(), config, num_cpus=0,
                   scheduling_strategy=_on_head(head))
    # Ray warns about restartable detached actors in a placement group (removing the group kills
    # them for good); that is what `kvmesh ray down` wants, so keep the warning off the console.
    logging.getLogger("ray.actor").setLevel(logging.ERROR)
    workers = [
        _start(name, "worker", config.worker_argv(i, store_address), config,
               num_cpus=config.num_cpus_per_worker, num_gpus=config.num_gpus_per_worker,
               scheduling_strategy=PlacementGroupSchedulingStrategy(
                   placement_group=group, placement_group_bundle_index=i))
        for i, name in enumerate(worker_names)
    ]
    router = _start(ROUTER_ACTOR, "router", config.router_argv(worker_addresses, store_address),
                    config, num_cpus=0, scheduling_strategy=_on_head(head))
    names = [STORE_ACTOR, *worker_names, ROUTER_ACTOR]
    infos = dict(zip(names, _ready([store, *workers, router], "the stack",
                                   config.ready_timeout_s), strict=True))
    expected = [store_address, *worker_addresses]
    actual = [infos[name].address for name in names[:-1]]
    if actual != expected:  # e.g. a node whose Ray IP is not the one its roles report
        raise DeployError(f"roles listen on {actual}, the router was given {expected}")
    return StackStatus(infos=infos, unavailable=[])


def status(timeout_s: float = 10.0) -> StackStatus:
    """Ask every kvmesh actor in the connected namespace for its info, all at once; an actor
    that does not answer within `timeout_s` (restarting, or dead) is listed as unavailable."""
    refs: dict[str, ray.ObjectRef] = {}
    unavailable: list[str] = []
    for name in _kvmesh_actor_names():
        try:
            refs[name] = ray.get_actor(name).info.remote()
        except ValueError:  # died meanwhile
            unavailable.append(name)
    ready: list[ray.ObjectRef] = []
    if refs:
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    infos: dict[str, RoleInfo] = {}
    for name, ref in refs.items():
        try:
            if ref in ready:
                infos[name] = RoleInfo(**ray.get(ref))
                continue
        except ray.exceptions.RayActorError:
            pass
        unavailable.append(name)
    return StackStatus(infos=infos, unavailable=sorted(unavailable))


def down(timeout_s: float = 30.0, is_graceful: bool = True) -> list[str]:
    """Stop every kvmesh actor (the router, then the workers together, then the store) and
    remove the worker placement group. Returns the actor names it removed. Waits until Ray has
    released their names. Graceful: each child gets SIGTERM and up to `timeout_s` first;
    otherwise the actors are killed at once and their children with them (SIGKILL)."""
    names = _kvmesh_actor_names()
    phases = [[n for n in names if n == ROUTER_ACTOR],
              [n for n in names if n not in (ROUTER_ACTOR, STORE_ACTOR)],
              [n for n in names if n == STORE_ACTOR]]
    for phase in phases:
        handles = []
        for name in phase:
            try:
                handles.append(ray.get_actor(name))
            except ValueError:
                continue  # died meanwhile
        if handles and is_graceful:  # SIGTERM each child, wait for all of them together
            stops: list[ray.ObjectRef] = [handle.stop.remote() for handle in handles]
            ray.wait(stops, num_returns=len(stops), timeout=timeout_s)
        for handle in handles:
            ray.kill(handle, no_restart=True)  # a child still there dies with it (PDEATHSIG)
    try:
        remove_placement_group(get_placement_group(WORKER_GROUP))
    except ValueError:
        pass  # no placement group: nothing was deployed, or a failed deploy before it
    deadline = time.monotonic() + timeout_s
    while _kvmesh_actor_names() and time.monotonic() < deadline:
        time.sleep(0.2)
    return names
