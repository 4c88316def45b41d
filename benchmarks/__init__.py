"""Benchmarks of swu-delivery, run by hand and never collected by the test suite."""
