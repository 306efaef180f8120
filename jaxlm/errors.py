"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user (config, data, paths); the message names the fix."""


class TrainingStopped(Exception):
    """The run cannot go on (diverged, a checkpoint could not be written); the message says
    where it stopped and what was kept. The CLI prints it as one line and exits 1."""
