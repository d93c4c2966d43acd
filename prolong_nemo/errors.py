"""Errors that mean "the input is wrong": the CLI prints them without a traceback (exit code 2)."""


class UserError(ValueError):
    """Bad input or configuration; the message names the file, sample or setting at fault."""


class DataError(UserError):
    """Bad ProLong data; the message names the domain folder, shard and sample."""


class ConversionError(UserError):
    """A checkpoint or config that the converter cannot represent faithfully (the CLI prints
    it without a traceback, exit code 2)."""
