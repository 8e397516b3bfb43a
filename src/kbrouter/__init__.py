"""kbrouter: step-wise retrieval-augmented reasoning across several knowledge bases."""

from kbrouter.types import (
    ChatMessage,
    ChatResult,
    Evidence,
    ImagePart,
    Modality,
    ModelCall,
    Query,
    Question,
    Retrieval,
    RouteAction,
    SamplingParams,
    Step,
    Table,
    TextPart,
    Trajectory,
)

__version__ = "0.1.0"

__all__ = [
    "ChatMessage",
    "ChatResult",
    "Evidence",
    "ImagePart",
    "Modality",
    "ModelCall",
    "Query",
    "Question",
    "Retrieval",
    "RouteAction",
    "SamplingParams",
    "Step",
    "Table",
    "TextPart",
    "Trajectory",
    "__version__",
]
