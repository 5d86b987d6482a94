"""Agent certificates: issuing at registration and renewal near expiry."""
