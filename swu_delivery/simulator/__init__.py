"""A local stand-in for the ESPs' HTTP APIs, for tests, benchmarks and account-free runs."""

from swu_delivery.simulator.core import SimulatorConfig
from swu_delivery.simulator.server import create_app, main, start_simulator

__all__ = ["SimulatorConfig", "create_app", "main", "start_simulator"]
