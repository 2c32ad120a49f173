"""The SDK's exceptions."""


class BatonError(Exception):
    """Something the SDK cannot do; the message names what is wrong."""


class ProtocolError(BatonError):
    """The supervisor broke the control protocol (the channel is closed)."""


class RejectSnapshot(Exception):
    """Raise it from a restore function to refuse a snapshot; the message is the reason."""
