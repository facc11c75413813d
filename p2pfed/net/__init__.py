"""The network layer: how a peer's updates are encoded and travel.

    wire             the message format (msgpack, strict schema, bounded; never pickle)
    transport        the Endpoint interface a peer talks to
    memory           an in-memory network for many peers in one process (drop, delay, churn)
    identity         libp2p key pairs and peer IDs
    framing          length-prefixed frames on a libp2p stream, and stream helpers
    libp2p_endpoint  the Endpoint over py-libp2p: one host per peer, streams to neighbours
    inbound          the receive side: frames from neighbours, each neighbour's buffer budget
    inbound_slots    a fix for py-libp2p 0.8.1's inbound connection limiter, which never got slots back
    listening        listen addresses checked before and after start (ListenError)
    stranger         dialling a peer as a stranger, for tests and benchmarks
    fastpath         faster Noise and Yamux data paths for p2pfed's own streams

Nothing here imports the model or the peer loop; the in-memory network does not import libp2p.
"""
