"""Test support code importable as `tests.support.*` (by the tests, their subprocesses and bench/).

`synthetic`: cheap stages that follow the stage contract, switched by MRHP_SYNTH_* environment
variables; they used to live in flows/ but are test machinery, not Prefect wiring.
"""
