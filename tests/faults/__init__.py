"""Fault injection: real ``baton worker`` processes, a real server, faults made on purpose."""
