"""The errors symbp raises at its boundaries.

Every problem with user input is a :class:`SpecError` carrying where it happened (file, layer,
field), so the command line can print it as one line and exit with status 2. The engine itself
never prints; it raises.
"""

from __future__ import annotations


class SymbpError(Exception):
    """Base class of every error symbp raises on purpose."""


class Position(str):
    """A layer named by its place, where it has no name yet (no type, a name that is not a
    string): ``2 of [[layers]]``, 1-based as people count, shown unquoted (``layer 2 of
    [[layers]]``), unlike a name (``layer 'fc1'``)."""


class SpecError(SymbpError):
    """Bad input: a spec file, a layer declaration or an expression string.

    ``str(err)`` reads ``FILE: layer 'NAME', field 'FIELD': MESSAGE`` with the parts that are
    known; :meth:`located` fills in parts that an outer caller knows (the file, the layer).
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        layer: str | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.layer = layer
        self.field = field

    def located(
        self, *, file: str | None = None, layer: str | None = None, field: str | None = None
    ) -> SpecError:
        """Return a copy with the missing location parts filled in."""
        return SpecError(
            self.message,
            file=self.file or file,
            layer=self.layer or layer,
            field=self.field or field,
        )

    def __str__(self) -> str:
        where = []
        if isinstance(self.layer, Position):
            where.append(f"layer {self.layer}")
        elif self.layer is not None:
            where.append(f"layer '{self.layer}'")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        text = ", ".join(where)
        if text:
            text = f"{text}: {self.message}"
        else:
            text = self.message
        return f"{self.file}: {text}" if self.file else text


class DerivationError(SymbpError):
    """The engine could not derive or verify something it was asked to."""
