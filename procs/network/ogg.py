"""How much of a client's Ogg stream may wait undecoded, sans I/O.

moshi's clients send Ogg/Opus (`/api/chat`), and sphn's reader keeps every byte of a packet until the
packet ends. A packet's end is written in the Ogg framing itself (RFC 3533): each page's segment table
lists lacing values, and a value below 255 ends a packet. A stream whose pages keep continuing one packet
(every lacing value 255) would be held without limit, yield no audio and raise no error.

`OggFraming` reads only the framing as the bytes go by (at most one page header, 282 bytes, is kept) and
says when a packet grows past `max_packet_bytes` or a page does not start with `OggS`: a page's segment
table is read before its body arrives, so an oversized packet is refused before its bytes are.

Only one logical stream (one serial number) is followed: moshi's clients send one, and packets are kept
per stream. And sphn's reader keeps every byte of the stream it was given, packets that decode to no
audio included (it skips any that starts like a header), so what a session may send is also bounded in
rate (procs/network/moshi_api.py: `MAX_OGG_BYTES_PER_S`).

An Opus packet is at most 120 ms of audio (RFC 6716 §3.2.5); at Opus's highest rate, 510 kbit/s, that is
7,650 bytes, and the header packets clients send (OpusHead, OpusTags) are a few hundred. 16 KiB is twice
the largest packet a real encoder writes.
"""

from __future__ import annotations

from typing import Final

MAX_PACKET_BYTES: Final = 16 * 1024
_CAPTURE: Final = b"OggS"
_FIXED_HEADER: Final = 27  # capture pattern ... page segments (RFC 3533 §6)


class OggFraming:
    """Follows a byte stream's Ogg pages; `feed` returns why the stream is refused, or None."""

    def __init__(self, max_packet_bytes: int = MAX_PACKET_BYTES) -> None:
        self.max_packet_bytes = max_packet_bytes
        self._header = bytearray()  # the page header being read (fixed part, then the segment table)
        self._body_left = 0  # bytes of the current page's body still to pass
        self.packet_bytes = 0  # bytes of the packet that has not ended yet
        self.pages = 0
        self.serial: int | None = None  # the stream's serial number: one logical stream per connection

    def feed(self, data: bytes | memoryview) -> str | None:
        view = memoryview(data)
        while view:
            if self._body_left:
                step = min(self._body_left, len(view))
                self._body_left -= step
                view = view[step:]
                continue
            need = _FIXED_HEADER if len(self._header) < _FIXED_HEADER else _FIXED_HEADER + self._header[26]
            take = min(need - len(self._header), len(view))
            self._header += view[:take]
            view = view[take:]
            if not _CAPTURE.startswith(bytes(self._header[:4])):
                return "bad Ogg/Opus stream: a page does not start with OggS"
            size = len(self._header)
            if size == _FIXED_HEADER:
                serial = int.from_bytes(self._header[14:18], "little")
                if self.serial is not None and serial != self.serial:  # a packet per stream would be kept
                    return "bad Ogg/Opus stream: a second logical stream (one per connection)"
                self.serial = serial
            if size >= _FIXED_HEADER and size == _FIXED_HEADER + self._header[26]:
                if (why := self._page_table(self._header[_FIXED_HEADER:])) is not None:
                    return why
                self._header.clear()
        return None

    def _page_table(self, lacing: bytearray) -> str | None:
        self.pages += 1
        for value in lacing:
            self.packet_bytes += value
            if self.packet_bytes > self.max_packet_bytes:
                return (f"bad Ogg/Opus stream: a packet longer than {self.max_packet_bytes} bytes "
                        "(an Opus packet is at most 120 ms)")
            if value < 255:
                self.packet_bytes = 0
        self._body_left = sum(lacing)
        return None
