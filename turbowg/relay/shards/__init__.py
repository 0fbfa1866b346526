"""Run the relay as N worker processes ("shards") that together behave as one DERP server.

Why processes: one Python event loop saturates one core long before the NIC. Each shard is a forked
process with its own uvloop event loop and its own `DerpServer`, and all of them accept on the same
port with SO_REUSEPORT, so the kernel spreads connections across them. One module per job:

  supervisor.py  forks the workers, hands each its channel ends, forwards stop signals, reaps them
  records.py     the record format on a channel between two shards (PACKET / PRESENT / GONE)
  peer.py        ShardPeer: one channel's end (asyncio, or the worker's C loop when it has one: then
                 packets cross in C with per-key XOFF/XON), the forwarder for the sibling's keys,
                 with batching and flow control
  links.py       ShardContext.attach: wires a worker's DerpServer to its siblings (key announcements,
                 pausing client reads while a channel is congested)
"""
