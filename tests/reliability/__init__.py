"""Fault-injection harness shared by tests/test_reliability.py and bench/chaos.py."""
