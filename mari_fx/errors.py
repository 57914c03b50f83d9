"""Exceptions raised by mari_fx; every message names the input, node or key at fault."""


class MariError(Exception):
    """Base class of every error mari_fx raises on purpose."""


class DeclarationError(MariError, ValueError):
    """A ``user_inputs=`` / ``item_inputs=`` selector does not fit the model."""


class TraceError(MariError):
    """The model could not be captured as a graph."""


class RequestError(MariError, ValueError):
    """A request-shaped call got inputs that do not form a valid request."""


class VerificationError(MariError, AssertionError):
    """A transformed module's output differs from the original model's."""


class RegistrationError(MariError, ValueError):
    """An extension table entry clashes with one already registered (see :mod:`mari_fx.registry`)."""
