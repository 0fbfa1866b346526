"""The DERP protocol (Tailscale's relay protocol, version 2): frames, keys, the client handshake, a client.

Usable on its own by anything that talks to a relay (the `derp-client` command, a WireGuard device
later). The relay application lives in turbowg.relay; nothing here imports it.
"""
