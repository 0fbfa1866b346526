"""The one harness for everything that needs real network namespaces: the tests, `turbowg bench tunnel` and
`turbowg demo`.

- `netns`:   namespaces, veth pairs, commands inside a namespace, bounded waits; whatever a context
             manager here creates it deletes again, also when the body raises.
- `daemon`:  one WireGuard daemon (turbowgd, wireguard-go or any binary with the same command line) in a
             namespace, and raw UAPI text to it.
- `tunnel`:  WireGuard tunnels between two namespaces, one implementation per side (turbowgd,
             wireguard-go or any binary with the same command line), configured only with stock `wg`.
- `udpgen`:  the UDP load generator and receiver (UDP_SEGMENT sends, UDP_GRO reads), paced or not,
             and a verified file transfer over it with resends.
- `tcpxfer`: a TCP transfer whose two ends print the SHA-256 of what they sent / received.
- `relay`:   one relay worker on 127.0.0.1 in the test's event loop (no namespace needed).
- `marks`:   pytest skip markers for the above (imports pytest; only tests import it).
"""
