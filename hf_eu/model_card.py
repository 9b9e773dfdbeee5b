"""Render the model card (README.md) of a saved composite from the template in `model_cards/`.

The card is declared by `ModelCardData` (library_name, base_model, pipeline_tag, tags) and rendered
by huggingface_hub from `model_cards/composite.md`, installed as the `hf_eu.model_cards` package.
"""

from __future__ import annotations

from importlib import resources

from huggingface_hub import ModelCard, ModelCardData

from .configuration import UncertaintyAwareConfig

__all__ = ["render_model_card"]

TEMPLATE_NAME = "composite.md"


def render_model_card(config: UncertaintyAwareConfig, repo_id: str | None = None) -> ModelCard:
    """The model card of a composite described by `config`, for the repository `repo_id` (or a folder)."""
    card_data = ModelCardData(
        library_name="hf_eu",
        base_model=config.target_name_or_path,
        pipeline_tag="text-generation",
        tags=["hf_eu", "epistemic-uncertainty", "speculative-decoding"],
    )
    template = resources.files("hf_eu.model_cards").joinpath(TEMPLATE_NAME).read_text(encoding="utf-8")
    return ModelCard.from_template(
        card_data,
        template_str=template,
        title=f"hf_eu uncertainty composite for {config.target_name_or_path}",
        repo_id=repo_id or "path/to/this/folder",
        target_name_or_path=config.target_name_or_path,
        target_revision=config.target_revision,
        num_drafts=config.num_drafts,
        has_proxy=config.has_proxy,
        proxy_dtype=getattr(config, "proxy_dtype", None),
        estimator=config.estimator,
        vocab_size=config.vocab_size,
        hf_eu_version=config.hf_eu_version,
        training=config.training,
    )
