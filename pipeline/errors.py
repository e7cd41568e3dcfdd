"""One exception hierarchy for the whole project; the CLI maps each class to an exit code.

Messages are written for users: they name the file, row, key path or field at fault and say
what was expected.
"""
from __future__ import annotations


class MRHPError(Exception):
    """Base class: any error the CLI reports as a one-line message instead of a traceback."""

    exit_code = 1


class ConfigError(MRHPError):
    """A manifest, config file or command-line override is invalid (names the key path)."""

    exit_code = 2


class ManifestError(ConfigError):
    """data_manifest.yaml is invalid: unknown key, wrong type, path escaping its root."""


class DataError(MRHPError):
    """Raw data is unusable: missing file, malformed JSON, missing column (names file and row)."""

    exit_code = 3


class StoreError(MRHPError):
    """The feature store is inconsistent or a requested item/segment/view is missing."""

    exit_code = 4


class StageError(MRHPError):
    """A stage cannot run at all (missing weights, missing side environment, bad parameters)."""

    exit_code = 5


class ResourceError(StageError):
    """A declared resource (word vectors, detector weights) is missing or fails its sha256."""


class TrainingError(MRHPError):
    """Training cannot go on (NaN loss, incompatible checkpoint, empty split)."""

    exit_code = 6


class OrchestrationError(MRHPError):
    """Prefect's API server could not be started or reached (names the setting to change)."""

    exit_code = 7
