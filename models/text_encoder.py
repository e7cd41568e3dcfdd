"""A trainable text encoder for `finetune_text_encoder: true` (MM-SS A.2: BERT fine-tuned at 5e-5).

The bert stage (features/text/bert.py) stores frozen last-layer features; a model that fine-tunes
the encoder instead builds a `TextEncoder` from the same manifest resource
(`resources.text_encoders.<name>`, weights sha256-verified, nothing downloaded) and runs it on
the word-piece ids the stage stored (`Batch.prod_text_ids` / `rev_text_ids`, filled by the data
loader whenever the bert view is read), so the inputs are exactly those the frozen features were
computed from and no tokenizer runs in the training loop. Its output follows the stage's rows:
`[CLS]` + pieces, the final `[SEP]` masked out unless `keep_sep` (MM-SS Eq. 2, |D| + 1 rows).

Fine-tuning a 12-layer BERT over every review of every product in a batch is slow on a CPU:
this path is meant for GPU boxes (docs/gpu_box.md); on CPU use the precomputed features.

Model config keys a model reads through `text_encoder_from_config`:
- `finetune_text_encoder` (bool, default False): build the encoder, else return None;
- `text_encoder` (str): the resource name; default: the dataset's `text_encoder` is not known
  here, so the name is required when fine-tuning;
- `manifest` (str | None): the manifest file (default $MRHP_MANIFEST or ./data_manifest.yaml);
- `text_encoder_random_init` (bool) / `text_encoder_seed` (int): seeded random weights, for tests;
- `keep_sep` (bool, default False).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from pipeline.errors import ConfigError


class TextEncoder(nn.Module):
    """A Hugging Face encoder whose parameters train with the model (`parameter_group`)."""

    def __init__(self, encoder: nn.Module, *, sep_id: int | None, keep_sep: bool = False, name: str = "") -> None:
        super().__init__()
        self.encoder = encoder
        self.sep_id = sep_id
        self.keep_sep = keep_sep
        self.name = name

    @property
    def hidden_size(self) -> int:
        return int(self.encoder.config.hidden_size)

    @classmethod
    def from_resource(cls, name: str, *, manifest: Any = None, random_init: bool = False, seed: int = 0,
                      keep_sep: bool = False) -> TextEncoder:
        """Load `resources.text_encoders.<name>` of `manifest` (a Manifest, a path, or None for
        the default manifest): the verified weights, or seeded random ones with `random_init`."""
        from features.text.bert import load_encoder
        from pipeline.manifest import Manifest, load_manifest

        m = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
        tokenizer, model = load_encoder(m.text_encoder(name), random_init=random_init, seed=seed)
        model.train()
        return cls(model, sep_id=tokenizer.sep_token_id, keep_sep=keep_sep, name=name)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, L) word-piece ids and their mask -> ((N, L, H) last hidden state with non-rows
        zeroed, (N, L) bool row mask). Rows are the stage's: the final [SEP] of each text is
        masked out unless keep_sep. An all-False row (an empty text) stays all-False."""
        mask = mask.bool()
        lengths = mask.sum(dim=1)
        safe_mask = mask.clone()
        safe_mask[lengths == 0, 0] = True  # the encoder needs one visible position per row
        hidden = self.encoder(input_ids=ids, attention_mask=safe_mask.long()).last_hidden_state
        rows = mask.clone()
        if not self.keep_sep and self.sep_id is not None:
            last = (lengths - 1).clamp(min=0)
            ends_in_sep = (lengths > 1) & (ids.gather(1, last[:, None]).squeeze(1) == self.sep_id)
            which = ends_in_sep.nonzero().squeeze(1)
            rows[which, last[which]] = False
        return hidden * rows[..., None].to(hidden.dtype), rows

    def parameter_group(self, lr: float) -> dict[str, Any]:
        """An optimizer group for the trainer's `parameter_groups` hook (e.g. lr 5e-5, A.2)."""
        return {"params": [p for p in self.parameters() if p.requires_grad], "lr": float(lr)}


def text_encoder_from_config(model_cfg: Mapping[str, Any]) -> TextEncoder | None:
    """The TextEncoder a model config asks for with `finetune_text_encoder: true`, else None."""
    if not model_cfg.get("finetune_text_encoder", False):
        return None
    name = model_cfg.get("text_encoder")
    if not name:
        raise ConfigError(
            "model_cfg.text_encoder: required with finetune_text_encoder: true (a name under "
            "resources.text_encoders in the manifest)"
        )
    return TextEncoder.from_resource(
        str(name), manifest=model_cfg.get("manifest"),
        random_init=bool(model_cfg.get("text_encoder_random_init", False)),
        seed=int(model_cfg.get("text_encoder_seed", 0)), keep_sep=bool(model_cfg.get("keep_sep", False)),
    )
