"""Peer-queue benchmarks: the same workloads run against other Postgres job queues."""
