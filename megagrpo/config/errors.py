"""Errors and warnings raised while loading and checking a recipe."""


class ConfigError(ValueError):
    """A recipe that cannot be used as given.

    ``errors`` holds one message per problem; ``str(error)`` joins them, one a line. Every message
    names the field(s) involved, the value(s) and the rule or the expected type.
    """

    def __init__(self, errors: str | list[str]):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        if len(self.errors) == 1:
            text = self.errors[0]
        else:
            text = f"{len(self.errors)} problems in the recipe:\n" + "\n".join(
                f"  - {e}" for e in self.errors
            )
        super().__init__(text)


class UnusedKeysWarning(UserWarning):
    """A recipe sets keys that megagrpo recognises (TRL / open-r1 / transformers) but ignores."""
