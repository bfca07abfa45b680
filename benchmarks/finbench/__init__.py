"""The benchmarks' shared code: synthetic data, the finsight-vs-TRL harness, its runners and its report.

Not part of the finsight package. The scripts in ``benchmarks/`` import it as ``finbench`` (their own folder
is first on ``sys.path`` when run as ``python benchmarks/<script>.py``); the tests add ``benchmarks/`` to the
path the same way (``pythonpath`` in pyproject.toml).
"""
