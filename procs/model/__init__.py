"""The speech model: engines, checkpoints, capacity arithmetic and torch set-up. No process lives here."""
