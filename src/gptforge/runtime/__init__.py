"""Where and how computation runs: device, dtype/autocast, seeding (set up by the command)."""
