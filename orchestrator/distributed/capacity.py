"""The most CPU and GPU a connected Ray cluster can ever offer, for `preflight(cluster_resources=...)`.

The rule, so that an autoscaling cluster that holds no GPU node yet is not refused:
- autoscaler v2 publishes its node types and their maximum counts: the capacity is that maximum
  (what Ray Train itself checks before placing workers), or what is up now if that is more;
- autoscaler v1 (the cluster launcher's monitor) publishes no maximum: unknown, nothing is refused;
- no autoscaler (a fixed cluster, `ray start` by hand, the embedded local Ray): what is up now is
  all there will ever be.
"""

from __future__ import annotations

import ray


def cluster_capacity() -> dict[str, float] | None:
    """Call after `ray.init()`; None when the cluster may grow by an amount it does not publish."""
    from ray._private import ray_constants
    from ray._private.state import state
    from ray.experimental.internal_kv import _internal_kv_get

    now = {key: float(value) for key, value in ray.cluster_resources().items()}
    maximum = state.get_max_resources_from_cluster_config()
    if maximum:
        return {key: max(now.get(key, 0.0), float(maximum.get(key, 0))) for key in {*now, *maximum}}
    if _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS):
        return None
    return now
