"""Direct-path selection for peers reachable over DERP: the disco codec (disco.py), the per-peer path state
machine (selector.py) and their timers (constants.py). Sans-IO: the daemon feeds events and executes actions."""
