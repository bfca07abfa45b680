"""The ``finsight`` command and ``python -m finsight``."""

import sys


def entry() -> int:
    """Run the command, with importing it inside the one-line error handling too.

    finsight's modules check the installed library versions when they are imported
    (:mod:`finsight.compat`); an unsupported version then ends the command with one ``error:`` line and exit
    status 1, like every other user-fixable error (see :func:`finsight.cli.lightning_cli.entry`), not with a traceback.
    """
    from finsight.errors import FinSightError

    try:
        from finsight import compat

        compat.quiet_known_noise()  # before the CLI's imports: some of the noise is raised while importing
        if sys.argv[1:2] == ["chat"]:
            # The chat needs neither Lightning nor the training stack that the CLI module imports: it starts
            # seconds sooner without them.
            from finsight.cli.chat import chat_main

            return chat_main(sys.argv[2:])
        from finsight.cli.lightning_cli import entry as run
    except FinSightError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return run()


if __name__ == "__main__":
    sys.exit(entry())
