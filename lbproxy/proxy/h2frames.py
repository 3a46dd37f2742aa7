"""What h2 is given in place of two of its own parts, to check what it checks late, wrongly or
not at all (RFC 9113): the frame buffer (`BoundedFrameBuffer`) and the HPACK decoder (`Decoder`).
h2conn.H2Session installs both on every HTTP/2 connection. They read h2's private attributes
`_data` and `_headers_buffer`: h2 is pinned (constraints.txt), and
tests/proxy/test_h2_conformance.py fails if its internals move.
"""

from __future__ import annotations

from typing import Any

import h2.exceptions
import h2.frame_buffer
import hpack
from h2.errors import ErrorCodes

# Frame header fields (RFC 9113 §4.1): SETTINGS is type 0x4; its ACK flag is 0x1.
_SETTINGS = 0x4
_ACK = 0x1


class Calm(h2.exceptions.ProtocolError):
    """A header block over our size limit (CONTINUATION flood)."""

    error_code = ErrorCodes.ENHANCE_YOUR_CALM


class _FrameSize(h2.exceptions.ProtocolError):
    """A frame of a size its type does not allow."""

    error_code = ErrorCodes.FRAME_SIZE_ERROR


class _Compression(h2.exceptions.ProtocolError):
    """A header block HPACK cannot decode (RFC 9113 §4.3)."""

    error_code = ErrorCodes.COMPRESSION_ERROR


class Decoder(hpack.Decoder):
    """hpack's decoder, whose decoding errors are connection errors of type COMPRESSION_ERROR
    (RFC 9113 §4.3; h2 makes them PROTOCOL_ERROR). An oversized header list stays h2's own
    (ENHANCE_YOUR_CALM)."""

    def decode(self, data: bytes, raw: bool = False) -> Any:
        try:
            return super().decode(data, raw)
        except hpack.OversizedHeaderListError:
            raise
        except hpack.HPACKError as e:
            raise _Compression(f"undecodable header block: {e}") from e


class BoundedFrameBuffer(h2.frame_buffer.FrameBuffer):
    """h2's frame buffer, with the header block held across CONTINUATION frames bounded in bytes
    (h2 bounds it at 64 frames only), and what h2 checks late or not at all checked as soon as a
    frame's 9-byte header is in: its length against SETTINGS_MAX_FRAME_SIZE (h2 buffers the whole
    frame first: up to 16 MiB), the client preface ending with SETTINGS (§3.4), and a SETTINGS ACK
    having no payload (§6.5: FRAME_SIZE_ERROR; h2 says PROTOCOL_ERROR). Reads h2's `_data` and
    `_headers_buffer` (h2 is pinned)."""

    max_block = 32 * 1024
    preface_done = False

    def __next__(self) -> Any:
        data = self._data
        if len(data) >= 9:
            length = (data[0] << 16) | (data[1] << 8) | data[2]
            if length > self.max_frame_size:
                raise h2.exceptions.FrameTooLargeError(
                    f"frame of {length} bytes; SETTINGS_MAX_FRAME_SIZE is {self.max_frame_size}")
            if data[3] == _SETTINGS and data[4] & _ACK and length:
                raise _FrameSize("SETTINGS ACK with a payload")
            if not self.preface_done:
                if data[3] != _SETTINGS or data[4] & _ACK:
                    raise h2.exceptions.ProtocolError(
                        "the client preface does not end with a SETTINGS frame")
                self.preface_done = True
        return super().__next__()

    def _update_header_buffer(self, f: Any) -> Any:
        out = super()._update_header_buffer(f)
        held = self._headers_buffer
        if held and sum(len(x.data) for x in held) > self.max_block:
            raise Calm("header block too large")
        return out
