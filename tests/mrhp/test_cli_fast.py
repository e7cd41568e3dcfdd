"""`mrhp --help` and every subcommand's help answer without importing torch, list the models, and
give every option a help line."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from models.registry import MODEL_NAMES
from mrhp.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
import contextlib, io, json, sys
from mrhp.cli import main
helps = {}
for argv in (["--help"], ["train", "--help"], ["compare", "--help"], ["evaluate", "--help"], ["predict", "--help"]):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            main(argv)
        except SystemExit:
            pass
    helps[" ".join(argv)] = buf.getvalue()
heavy = sorted(m for m in ("torch", "scipy", "matplotlib", "prefect") if m in sys.modules)
print(json.dumps({"heavy": heavy, "helps": helps}))
"""


def test_help_imports_no_torch_and_train_help_lists_the_models():
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["heavy"] == [], f"--help imported {out['heavy']}"
    assert "train" in out["helps"]["--help"]
    train_help = " ".join(out["helps"]["train --help"].split())
    for name in MODEL_NAMES:
        assert name in train_help
    assert "--preset" in train_help and "--show-config" in train_help


def _actions(parser: argparse.ArgumentParser):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                for b in _actions(sub):
                    yield f"{name} {b[0]}", b[1]
        elif not isinstance(a, argparse._HelpAction):
            yield "/".join(a.option_strings) or a.dest, a


def test_every_option_of_every_command_has_a_help_line():
    missing = [name for name, a in _actions(build_parser()) if not (a.help and a.help.strip())
               and a.help != argparse.SUPPRESS]
    assert missing == []
