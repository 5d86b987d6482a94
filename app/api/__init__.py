"""What every router shares: dependencies and the problem+json responses."""
