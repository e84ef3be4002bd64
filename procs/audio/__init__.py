"""Audio helpers with no process of their own: resampling, the streaming Silero VAD."""
