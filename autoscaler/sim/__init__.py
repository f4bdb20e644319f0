"""Cluster simulation: workloads (`trace`) for the simulator and the capacity benchmark."""
