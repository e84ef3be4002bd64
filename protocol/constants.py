"""Wire-format constants shared by the server, the browser client and the test bots.

Audio travels as binary WebSocket frames: one prefix byte, then exactly one 20 ms frame of mono
signed 16-bit little-endian PCM. Control travels as JSON text frames.
"""

from typing import Final

PROTOCOL_VERSION: Final = 1

# Prefix byte of every binary frame; a frame's direction is part of its identity.
CLIENT_AUDIO: Final = 0x01
SERVER_AUDIO: Final = 0x02
# Opus, when the client asks for it at connect time (`/ws?codec=opus`): one Opus packet per 20 ms frame.
CLIENT_OPUS: Final = 0x03
SERVER_OPUS: Final = 0x04
# RFC 6716 §3.2.1: one Opus frame is at most 1275 bytes, so a 20 ms packet of one frame never needs more.
# It is the `frame_bytes` that `session_start` names for Opus (the largest packet, not a fixed size).
MAX_OPUS_PACKET_BYTES: Final = 1275
# Codecs a client may ask for with `?codec=`; the first is what a client that asks for none gets.
CODECS: Final = ("pcm", "opus")

FRAME_MS: Final = 20
BYTES_PER_SAMPLE: Final = 2  # s16le

IN_RATE: Final = 16_000
IN_FRAME_SAMPLES: Final = IN_RATE * FRAME_MS // 1000  # 320
IN_FRAME_BYTES: Final = IN_FRAME_SAMPLES * BYTES_PER_SAMPLE  # 640

OUT_RATE: Final = 24_000
OUT_FRAME_SAMPLES: Final = OUT_RATE * FRAME_MS // 1000  # 480
OUT_FRAME_BYTES: Final = OUT_FRAME_SAMPLES * BYTES_PER_SAMPLE  # 960

# One model step (Mimi's 12.5 Hz frame) takes four 20 ms frames and gives four back: a block.
FRAMES_PER_BLOCK: Final = 4
BLOCK_MS: Final = FRAME_MS * FRAMES_PER_BLOCK  # 80
IN_SAMPLES_PER_BLOCK: Final = IN_FRAME_SAMPLES * FRAMES_PER_BLOCK  # 1280 at 16 kHz
OUT_SAMPLES_PER_BLOCK: Final = OUT_FRAME_SAMPLES * FRAMES_PER_BLOCK  # 1920 at 24 kHz: one Mimi frame

# Close codes of our own (the application range 4000-4999). A client that abandons a connection that went
# silent, to reconnect and resume its session, closes it with CLOSE_RECONNECTING: the server keeps the
# session for its resume window, as for a link that died with no close at all. A connection whose session
# was resumed on another one is closed with CLOSE_RESUMED_ELSEWHERE.
CLOSE_RECONNECTING: Final = 4000
CLOSE_RESUMED_ELSEWHERE: Final = 4001
# A resume token (`session_start.resume_token`, `/ws?resume=`) is URL-safe base64 of at most this length.
MAX_RESUME_TOKEN_CHARS: Final = 128

# Largest JSON control frame accepted, in UTF-8 bytes. Every legitimate control message is far
# smaller; the cap bounds parsing work and nesting depth an untrusted peer can cause.
MAX_TEXT_BYTES: Final = 4096

# Ids travel through JavaScript, whose numbers are exact only up to 2**53 - 1.
MAX_SAFE_INTEGER: Final = 2**53 - 1
