"""The one exception the protocol decoders raise."""

from protocol.codes import ErrorCode
from protocol.messages import Error


class ProtocolError(Exception):
    """A frame from the network violates the protocol; `code` says how, `msg` says where, for humans."""

    def __init__(self, code: ErrorCode, msg: str) -> None:
        super().__init__(f"{code.value}: {msg}")
        self.code = code
        self.msg = msg

    def to_message(self, fatal: bool = False) -> Error:
        """The `error` control message that tells the peer about this violation."""
        return Error(code=self.code, msg=self.msg, fatal=fatal)

    def __reduce__(self) -> tuple[type["ProtocolError"], tuple[ErrorCode, str]]:
        # Exceptions pickle their `args` by default; ours has a two-argument constructor, so an
        # explicit recipe keeps it transferable between processes.
        return (type(self), (self.code, self.msg))
