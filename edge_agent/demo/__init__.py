"""``edge-agent demo``: the whole system on one machine, with embedded defaults."""

from edge_agent.demo.runner import DemoOptions, run_demo

__all__ = ["DemoOptions", "run_demo"]
