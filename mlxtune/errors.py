"""The errors a user can cause. The CLI prints them as one line and exits 2."""


class MlxtuneError(Exception):
    """A problem the user can fix: bad input, missing file, no memory. Never a bug."""

    exit_code = 2


class ConfigError(MlxtuneError):
    """One or more problems in a config file or its overrides, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class DataError(MlxtuneError):
    """A dataset file that cannot be read or does not have the expected shape."""


class ModelError(MlxtuneError):
    """A model that cannot be found, fetched, converted or loaded."""


class AdapterError(MlxtuneError):
    """An adapter that cannot be used: missing, wrong shape, rank too high, unknown name."""


class Interrupted(MlxtuneError):
    """The user pressed Ctrl-C and the work was saved; exit like an interrupted program does."""

    exit_code = 130
