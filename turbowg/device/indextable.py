"""The index table: random 32-bit local indices naming our in-flight handshakes and our keypairs.

A peer's messages carry our index (the receiver field), so one dict lookup finds the keypair of a transport
message or the handshake a response answers (wireguard-go's device/indextable.go). An index names either a
peer's in-flight handshake (entry.keypair None) or one keypair; it is freed when the handshake is superseded
or the keypair dropped.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from turbowg.device.keypair import Keypair
from turbowg.device.peer import Peer


class IndexEntry:
    """What a local index names: a peer's in-flight handshake (keypair None) or a keypair."""

    __slots__ = ("peer", "keypair")

    def __init__(self, peer: Peer, keypair: Keypair | None = None) -> None:
        self.peer = peer
        self.keypair = keypair


class IndexTable(dict[int, IndexEntry]):
    """local index -> IndexEntry. A dict, so that the receive path's lookup is one C-level `get`."""

    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self._rng = rng

    def new_index(self, peer: Peer, keypair: Keypair | None = None) -> int:
        """A fresh random index naming `peer`'s handshake (or `keypair`)."""
        index = self._rng.getrandbits(32)
        while index in self:  # 2**32 space: a handful of tries at most
            index = self._rng.getrandbits(32)
        self[index] = IndexEntry(peer, keypair)
        return index

    def lookup(self, index: int) -> IndexEntry | None:
        return self.get(index)

    def handshake_peer(self, index: int) -> Peer | None:
        """The peer whose in-flight handshake `index` names, else None (also for a keypair's index)."""
        entry = self.get(index)
        if entry is None or entry.keypair is not None:
            return None
        return entry.peer

    def free(self, index: int) -> None:
        self.pop(index, None)

    def free_handshake(self, peer: Peer) -> None:
        """Forget the index of `peer`'s in-flight handshake, if any."""
        index = peer.handshake_index
        if index is None:
            return
        entry = self.get(index)
        if entry is not None and entry.peer is peer and entry.keypair is None:
            del self[index]
        peer.handshake_index = None

    def free_keypairs(self, keypairs: Iterable[Keypair]) -> None:
        """Forget the indices of dropped keypairs."""
        for keypair in keypairs:
            entry = self.get(keypair.local_index)
            if entry is not None and entry.keypair is keypair:
                del self[keypair.local_index]
