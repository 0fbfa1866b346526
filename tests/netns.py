"""Kept for tests that still import the harness by this name: it lives in turbowg.testing now."""

from turbowg.testing.marks import needs_netns
from turbowg.testing.netns import Pair, can_use_netns, namespace_pair, ns_run, run

__all__ = ["Pair", "can_use_netns", "namespace_pair", "needs_netns", "ns_run", "run"]
