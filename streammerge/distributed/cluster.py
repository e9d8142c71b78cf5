"""Joining a Ray cluster, or starting one on this machine, and where its nodes are.

``--ray local`` starts Ray here with every socket on 127.0.0.1. Ray alone does not: asked for
127.0.0.1 it still gives the GCS the host's own interface address. Ray takes its node address from
loopback only where it thinks clusters are unsupported (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``);
set with ``node_ip_address`` the GCS, raylets, workers, dashboard and agents all listen on it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import UsageError

LOOPBACK = "127.0.0.1"
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
NETWORK_FS = re.compile(r"^(nfs4?|cifs|smb3?|lustre|gpfs|beegfs|ceph|glusterfs|9p|fuse\..*|virtiofs|wekafs|panfs)$")


def import_ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'streammerge[ray]' (on every node of the cluster)") from None
    return ray


def loopback_env() -> None:
    """Before Ray starts in this process: keep it on 127.0.0.1, and send no usage statistics. Ray
    reads the variable once, when imported; a Ray imported earlier is told the same directly."""
    os.environ.update(LOOPBACK_ENV)
    ray_constants = import_ray()._private.ray_constants
    ray_constants.ENABLE_RAY_CLUSTER = False


def on_loopback() -> bool:
    """Whether a Ray started from this process would give its node 127.0.0.1."""
    return str(import_ray()._private.services.get_node_ip_address()) == LOOPBACK


class Connection:
    """``with Connection(address):`` Ray is initialised inside (and shut down after, if it was we who
    started or joined it). ``address``: ``local`` (a Ray of this machine, on loopback), ``auto`` (the
    cluster this machine belongs to: ``RAY_ADDRESS`` or the one ``ray start`` began here), or
    ``HOST:PORT`` of a cluster's head. None: the Ray this process has already joined, else ``auto``."""

    def __init__(self, address: str | None) -> None:
        if address is not None and not (address in ("local", "auto") or re.fullmatch(r"(ray://)?[\w.\-\[\]:]+:\d+", address)):
            raise UsageError(f"--ray {address}: expected auto, local or HOST:PORT of the cluster's head")
        self.address = address
        self.ray = import_ray()
        self._ours = False

    def __enter__(self) -> Connection:
        ray = self.ray
        if ray.is_initialized():
            return self
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
        if self.address == "local":
            loopback_env()
            if not on_loopback():
                raise UsageError("--ray local: Ray would not stay on 127.0.0.1 here; start a cluster with `ray start "
                                 "--head --node-ip-address 127.0.0.1` and pass its HOST:PORT")
            kwargs["_node_ip_address"] = LOOPBACK
        else:
            kwargs["address"] = self.address or "auto"
        try:
            ray.init(**kwargs)
        except ConnectionError as exc:
            raise UsageError(f"--ray {self.address or 'auto'}: no Ray cluster there ({exc}); start one with "
                             "`ray start --head`, or pass --ray local") from None
        self._ours = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ours:
            self.ray.shutdown()

    def driver_node(self) -> str:
        return str(self.ray.get_runtime_context().get_node_id())

    def capacity(self, *, gpus: bool) -> int:
        """How many one-CPU (or one-GPU) workers the cluster can hold at once."""
        return int(self.ray.cluster_resources().get("GPU" if gpus else "CPU", 0))


def node_local(path: str | Path) -> bool:
    """Whether a local path is on this node's own disk (not a network filesystem every node mounts)."""
    target = os.path.realpath(path)
    best, fstype = "", ""
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    mount = parts[1].replace("\\040", " ")
                    if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                        best, fstype = mount, parts[2]
    except OSError:
        return False  # (not Linux: no preference)
    return not NETWORK_FS.match(fstype)
