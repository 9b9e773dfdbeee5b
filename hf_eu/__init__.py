"""hf_eu: per-token epistemic uncertainty for HuggingFace causal LMs from drafts and a distilled proxy.

Swap `AutoModelForCausalLM` for `UncertaintyAwareModelForCausalLM`, attach drafts (and a proxy), and
`generate(..., return_dict_in_generate=True)` returns `epistemic_uncertainty` per generated token.
"""

from ._version import __version__
from .aggregation import aggregate_uncertainty
from .auto import UncertaintyTextGenerationPipeline, register_auto_classes
from .configuration import UncertaintyAwareConfig
from .defaults import load_default
from .answer_risk import AnswerRiskDetector, abstain
from .eu_head import EUHead
from .estimators import Estimator, EstimatorOutput, get_estimator, list_estimators, register_estimator
from .gaussian import GaussianStudentForCausalLM
from .incremental import IncrementalScorer
from .modeling import UncertaintyAwareModelForCausalLM, generated_token_mask
from .outputs import UncertaintyGenerateBeamOutput, UncertaintyGenerateOutput, UncertaintyOutput
from .scoring import score_tokens, score_tokens_many
from .stopping import EUThresholdCriteria
from .streaming import EUTextIteratorStreamer, EUTextPiece, EUTextStreamer
from .truncation import truncated_copy

register_auto_classes()  # AutoConfig, AutoModelForCausalLM and the pipeline task know hf_eu

__all__ = [
    "__version__",
    "UncertaintyAwareModelForCausalLM",
    "UncertaintyAwareConfig",
    "UncertaintyOutput",
    "UncertaintyGenerateOutput",
    "UncertaintyGenerateBeamOutput",
    "aggregate_uncertainty",
    "generated_token_mask",
    "score_tokens",
    "score_tokens_many",
    "load_default",
    "truncated_copy",
    "Estimator",
    "EstimatorOutput",
    "get_estimator",
    "list_estimators",
    "register_estimator",
    "register_auto_classes",
    "UncertaintyTextGenerationPipeline",
    "IncrementalScorer",
    "EUTextIteratorStreamer",
    "EUTextStreamer",
    "EUTextPiece",
    "EUThresholdCriteria",
    "GaussianStudentForCausalLM",
    "EUHead",
    "AnswerRiskDetector",
    "abstain",
]
