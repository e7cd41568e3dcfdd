"""A trainable text encoder for `finetune_text_encoder: true` (MM-SS A.2: BERT fine-tuned at 5e-5).

The bert stage (features/text/bert.py) stores frozen last-layer features; a model that fine-tunes
the encoder instead builds a `TextEncoder` from the same manifest resource
(`resources.text_encoders.<name>`, weights sha256-verified, nothing downloaded) and runs it on
the word-piece ids the stage stored (`Batch.prod_text_ids` / `rev_text_ids`, filled by the data
loader whenever the bert view is read), so the inputs are exactly those the frozen features were
computed from and no tokenizer runs in the training loop. Its output follows the stage's rows:
`[CLS]` + pieces, the final `[SEP]` masked out unless `keep_sep` (MM-SS Eq. 2, |D| + 1 rows).
With the weights the stage used, its output at initialisation equals the stored features (up to
their float16 rounding); training then moves the weights away from them.

Fine-tuning a 12-layer BERT over every review of every product in a batch is slow on a CPU and
its activation memory grows with the batch's reviews x pieces: this path is meant for GPU boxes
(docs/gpu_box.md); on CPU use the precomputed features (the default).

Model config keys a model reads through `text_encoder_from_config` (MM-SS: MMSSConfig fields):
- `finetune_text_encoder` (bool, default False): build the encoder, else return None;
- `text_encoder` (str): the resource name, required when fine-tuning;
- `manifest` (str | None): the manifest file (default $MRHP_MANIFEST or ./data_manifest.yaml);
- `text_encoder_random_init` (bool) / `text_encoder_seed` (int): seeded random weights, as the
  bert stage's `random_init` / `seed` (demos and tests);
- `keep_sep` (bool, default False), as the bert stage's.

`resolve_text_encoder(cfg, manifest)` fills those keys of a training config from the manifest:
the dataset's `text_encoder`, the manifest's path and the bert stage's random_init / seed /
keep_sep, so the encoder is the one whose ids the bert view stored, the run's config.yaml
records it, and `load_run` (`mrhp evaluate` / `predict`) rebuilds the same encoder before the
checkpoint's state dict restores the fine-tuned weights. `mrhp train` and the training flow
call it through `models.config.resolve_train_config`; `models.trainer.train_seeds` calls it again
(idempotent) for configs built elsewhere.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
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


# model_cfg keys set from the manifest when fine-tuning -> where they come from (for messages)
_FROM_MANIFEST = {
    "text_encoder_random_init": "stages.bert.random_init",
    "text_encoder_seed": "stages.bert.seed",
    "keep_sep": "stages.bert.keep_sep",
}


def resolve_text_encoder(cfg: Any, manifest: Any) -> Any:
    """`cfg` (a TrainConfig) with the text-encoder keys of its model_cfg filled from `manifest`
    when model_cfg asks for `finetune_text_encoder: true`; unchanged otherwise.

    Sets `text_encoder` (the dataset's `text_encoder`), `manifest` (the manifest's resolved
    path), `text_feat_dim` (the encoder's hidden_size from its config.json) and the bert stage's
    random_init / seed / keep_sep. Raises ConfigError (one line) when the dataset declares no
    text encoder, when model_cfg names another encoder than the dataset's, or when it sets
    random_init / seed / keep_sep to a non-default value the bert stage does not use (the ids
    the model reads were made by that stage). Idempotent."""
    from features.text.bert import encoder_config
    from models.config import train_config
    from models.registry import model_config_class
    from pipeline.config import to_mapping

    mc = dict(cfg.model_cfg or {})
    if not mc.get("finetune_text_encoder", False):
        return cfg
    where = f"dataset {cfg.dataset!r}"
    name = manifest.dataset(cfg.dataset).text_encoder
    if not name:
        raise ConfigError(
            f"{where}: model_cfg.finetune_text_encoder: true needs the dataset's text encoder, and "
            f"datasets.{cfg.dataset}.text_encoder is not set in {manifest.path} (name one under "
            f"resources.text_encoders, then `mrhp extract --dataset {cfg.dataset} --stage bert`)"
        )
    if mc.get("text_encoder") not in (None, name):
        raise ConfigError(
            f"{where}: model_cfg.text_encoder {mc['text_encoder']!r} is not the dataset's encoder "
            f"{name!r} (datasets.{cfg.dataset}.text_encoder in {manifest.path}); the bert view holds "
            f"{name!r}'s word-piece ids: drop model_cfg.text_encoder"
        )
    stage = manifest.stage_params("bert")
    random_init = bool(stage.random_init)
    wanted: dict[str, Any] = {
        "text_encoder_random_init": random_init,
        "text_encoder_seed": int(stage.seed) if random_init else 0,
        "keep_sep": bool(stage.keep_sep),
    }
    ccls = model_config_class(cfg.model)
    defaults = {f.name: f.default for f in dataclasses.fields(ccls)} if ccls is not None else {}
    for key, value in wanted.items():
        given = mc.get(key, defaults.get(key))
        if given != value and given != defaults.get(key):
            raise ConfigError(
                f"{where}: model_cfg.{key}: {given!r} contradicts {_FROM_MANIFEST[key]}: {value!r} in "
                f"{manifest.path} (the stage that stored the ids the encoder reads); drop model_cfg.{key}"
            )
    hidden = encoder_config(manifest.text_encoder(name)).get("hidden_size")
    if not isinstance(hidden, int) or hidden < 1:
        raise ConfigError(f"resources.text_encoders.{name}: config.json has no positive hidden_size")
    new_mc = {**mc, **wanted, "text_encoder": name, "manifest": str(Path(manifest.path).resolve()),
              "text_feat_dim": hidden}
    if new_mc == mc:
        return cfg
    return train_config({**to_mapping(cfg), "model_cfg": new_mc})
