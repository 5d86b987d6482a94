"""Who is calling: agent tokens, client certificates and the operator's token."""
