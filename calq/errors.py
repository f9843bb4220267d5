"""One exception type for bad input: it prints as one line (what, where, how to fix) and exits 2."""


class CalqError(Exception):
    """Bad input from the user. The CLI prints `str(err)` and exits with code 2."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.line())

    def line(self) -> str:
        parts = [f"{self.where}: {self.what}" if self.where else self.what]
        if self.fix:
            parts.append(f"fix: {self.fix}")
        return " — ".join(parts)
