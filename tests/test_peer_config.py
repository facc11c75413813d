"""A networked peer's identities and addresses are checked before any work: one clear error naming the key."""

from __future__ import annotations

import pytest

from p2pfed.config import ConfigError, NeighbourConfig, PeerConfig
from p2pfed.net.identity import identity_from_seed, peer_id_of
from p2pfed.peer import check_addresses, key_pair_of

OWN = peer_id_of(identity_from_seed(1))
OTHER = peer_id_of(identity_from_seed(2))


def config_with(*neighbours: NeighbourConfig, listen=("/ip4/127.0.0.1/tcp/0",)) -> PeerConfig:
    return PeerConfig(num_peers=3, identity_seed=1, listen=listen, neighbours=neighbours)


@pytest.mark.parametrize("neighbours, message", [
    ((NeighbourConfig("peer1", "Qmnotanid"),), r"neighbours\[0\] \(peer1\)\.peer_id: 'Qmnotanid' is not a libp2p"),
    ((NeighbourConfig("peer1", ""),), r"neighbours\[0\] \(peer1\)\.peer_id: '' is not a libp2p peer ID"),
    ((NeighbourConfig("peer1", OWN),), r"neighbours\[0\] \(peer1\)\.peer_id: .* is this peer's own ID"),
    ((NeighbourConfig("peer1", OTHER), NeighbourConfig("peer2", OTHER)), r"neighbours\[1\] .* two neighbours"),
    ((NeighbourConfig("peer1", OTHER, ("/ip4/127.0.0.1/tcp/x",)),), r"neighbours\[0\] \(peer1\)\.addrs"),
    ((NeighbourConfig("peer1", OTHER, (f"/ip4/127.0.0.1/tcp/4001/p2p/{OWN}",)),), r"names peer .*, not"),
])
def test_bad_neighbours_are_configuration_errors(neighbours, message):
    with pytest.raises(ConfigError, match=message):
        check_addresses(config_with(*neighbours), OWN)


def test_a_malformed_listen_address_is_a_configuration_error():
    with pytest.raises(ConfigError, match=r"listen\[1\]: '/ip4/1\.2\.3/tcp/1' is not a multiaddr"):
        check_addresses(config_with(listen=("/ip4/127.0.0.1/tcp/0", "/ip4/1.2.3/tcp/1")), OWN)


def test_good_addresses_pass():
    check_addresses(config_with(NeighbourConfig("peer1", OTHER, (f"/ip4/127.0.0.1/tcp/4001/p2p/{OTHER}",))), OWN)


def test_a_key_file_of_the_wrong_size_is_a_configuration_error(tmp_path):
    key = tmp_path / "peer.key"
    key.write_bytes(b"short")
    key.chmod(0o600)
    with pytest.raises(ConfigError, match=r"key_file: identity key .* must hold exactly 32 bytes"):
        key_pair_of(PeerConfig(key_file=str(key)))
