"""The application floor (top, floor 5): the `mrhp` command line, its subcommands and the demo.

Floors, ground first: pipeline (plumbing) < features (stages) < models (training) < flows
(Prefect wiring) < mrhp (this package). A module imports only from its own floor or below;
tests/test_layering.py enforces it.
"""
