"""The lockout forecast: agents whose certificates lapse within N hours with no renewal in sight."""
