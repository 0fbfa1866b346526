"""The DERP relay application (derper's job): server, HTTP front, mesh, shards, STUN, metrics, CLI.

It is built on the protocol package turbowg.derp (frames, keys, the client handshake); nothing in
turbowg.derp imports from here.
"""
