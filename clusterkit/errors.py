"""User-facing errors.

Every mistake a user can make (a bad recipe, a missing data folder, an unknown
plugin) is raised as a :class:`ClusterkitError` subclass whose message is one
self-contained paragraph: what is wrong, where, and how to fix it.  The CLI
prints that paragraph and exits non-zero; ``--debug`` adds the traceback.
Anything else that escapes is a bug in clusterkit or in a plugin.
"""


def warn(text: str) -> None:
    """A ``clusterkit: warning: TEXT`` line on stderr, from rank 0 only, that does not break a running
    progress bar: the one way clusterkit warns a user (the run goes on)."""
    import sys

    from tqdm.auto import tqdm

    from . import distributed

    if distributed.is_main():
        tqdm.write(f"clusterkit: warning: {text}", file=sys.stderr)


class ClusterkitError(Exception):
    """Base class of errors caused by user input; the message is the whole story."""

    exit_code = 2


class RecipeError(ClusterkitError):
    """A recipe, an ``--set`` override or a plugin parameter is invalid."""


class PluginError(ClusterkitError):
    """A plugin is unknown, failed to load, or failed inside a hook."""


class DataError(ClusterkitError):
    """A dataset is missing, empty, corrupt or inconsistent with the recipe."""


class RunDirError(ClusterkitError):
    """A run directory cannot be created, resumed or overwritten as asked."""


class UntrustedCheckpointError(RunDirError):
    """A checkpoint holds objects beyond tensors and plain data, which could run code when loaded."""


class DiskFullError(RunDirError):
    """A file of the run could not be written because the disk is full."""
