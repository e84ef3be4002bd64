"""The inference process: client audio from the rings, one batched model step, model audio back."""
