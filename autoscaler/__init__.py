"""Control plane: placement, preemption, keep-alive (autoscaler issue)."""
