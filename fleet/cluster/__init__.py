"""The cluster: signed datagrams, membership, peers, transports and one host's agent."""
