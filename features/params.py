"""Shim: the stage parameter records moved down to pipeline/params.py (the manifest validates them)."""
from pipeline.params import (  # noqa: F401
    STAGE_PARAMS,
    BertParams,
    EmbeddingsParams,
    FlowParams,
    ProbesParams,
    ProposalParams,
    RoisParams,
    TokensParams,
)
