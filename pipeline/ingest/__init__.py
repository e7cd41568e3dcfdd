"""Ingestion: bring outside material in as raw files, records or store entries; no stage runs here.

A stage (features/, planned and run by pipeline.runner) computes a fingerprinted output from
records and files already in place. Ingestion is what puts them there, or fills the store from
work done elsewhere:

- `fetch.py`: download a dataset's image URLs into its canonical image layout
  (`mrhp fetch-images`); stdlib + PIL only, with its own decode check on every download.
- `importers.py`: read ROI features extracted elsewhere (LXMERT TSV, bottom-up-attention npz,
  torch files) and write them to the store as stage "rois" under an `import-...` fingerprint,
  with the stored fields of `pipeline.schema.rois_schema`, so they read exactly like extracted
  ones (`mrhp import-features`); and export a view back to TSV.

The dataset readers and builders beside it (`pipeline/datasets/`) turn raw tables into
`DatasetRecords`. Floor 1 (docs/design.md): nothing here imports features/, models/, flows/ or mrhp/.
"""
