"""The VAD process: Silero voice-activity detection over its own copy of every session's audio."""
