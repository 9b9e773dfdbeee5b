"""Model card templates shipped with hf_eu (installed as `hf_eu.model_cards`)."""
