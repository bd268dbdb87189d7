"""The most CPU and GPU a connected Ray cluster can ever offer, for `preflight(cluster_resources=...)`.

The rule refuses a config only when the cluster can never serve it, so an autoscaling cluster that
holds no GPU node yet is not refused:
- autoscaler v2 publishes its node types with their maximum counts: the capacity is that maximum
  (what Ray Train itself checks before placing workers), or what is up now if that is more;
- Ray's v1 monitor runs on every head node; on a cluster started by hand (`ray start`, the embedded
  local Ray) it drives a read-only provider whose node types are the nodes themselves
  (`node_<node id>`): nothing can be added, and what is up now is all there will be;
- anything else (a v1 autoscaler with configured node types, a monitor that has not reported
  yet): unknown, nothing is refused here (Ray Train and Tune wait for the autoscaler instead).
"""

from __future__ import annotations

import ray

from orchestrator.compat import autoscaler_maximum, autoscaler_node_types


def cluster_capacity() -> dict[str, float] | None:
    """Call after `ray.init()`; None when the cluster may grow or its kind is not known yet."""
    now = {key: float(value) for key, value in ray.cluster_resources().items()}
    maximum = autoscaler_maximum()
    if maximum:
        return {key: max(now.get(key, 0.0), maximum.get(key, 0.0)) for key in {*now, *maximum}}
    node_types = autoscaler_node_types()
    if node_types and all(node_type == f"node_{node_id}" for node_id, node_type in node_types.items()):
        return now
    return None
