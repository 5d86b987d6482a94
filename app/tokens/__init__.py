"""Registration tokens: minted by operators, spent once by a registering agent."""
