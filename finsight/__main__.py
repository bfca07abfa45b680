"""The ``finsight`` command and ``python -m finsight``: the one entry point."""

import sys


def entry() -> int:
    """Run the command; every user-fixable error ends it with one ``error:`` line and exit status 1.

    Every such error subclasses :class:`~finsight.errors.FinSightError` (a damaged checkpoint, a NaN/inf in
    training, a bad source, model or evaluation reference, a precision or strategy this setup cannot run, an
    unsupported library version found while importing, see :mod:`finsight.compat`): the user reads what to
    fix, not a traceback. ``finsight.cli.lightning_cli.main`` returns the CLI object instead, for tests.
    """
    from finsight.errors import FinSightError

    if sys.argv[1:] in (["--version"], ["-V"]):
        from finsight.cli.version import version_report

        print(version_report())
        return 0
    try:
        from finsight import compat
        from finsight.tensors_only import tensors_only

        compat.quiet_known_noise()  # before the CLI's imports: some of the noise is raised while importing
        # Every checkpoint any command reads, through finsight, Lightning or DeepSpeed, is data, never code.
        with tensors_only():
            if sys.argv[1:2] == ["chat"]:
                # The chat needs neither Lightning nor the training stack that the CLI module imports: it
                # starts seconds sooner without them.
                from finsight.cli.chat import chat_main

                return chat_main(sys.argv[2:])
            from finsight.cli import lightning_cli

            lightning_cli.main()  # LightningCLI reads sys.argv itself
    except FinSightError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(entry())
