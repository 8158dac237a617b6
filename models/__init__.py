"""Training, evaluation and export of the suggestion model, and its runtime API.

The agent needs only ``SuggestionModel`` (load a model directory, suggest) and the errors;
see MODEL_FORMAT.md. Training, evaluation and the simulator never import the agent.
"""

from models.errors import (
    ModelError,
    ModelFormatError,
    ModelIntegrityError,
    ModelVerificationError,
)
from models.features import SuggestionContext
from models.serving import DEFAULT_MODEL_DIR, SuggestionModel

__all__ = [
    "DEFAULT_MODEL_DIR",
    "ModelError",
    "ModelFormatError",
    "ModelIntegrityError",
    "ModelVerificationError",
    "SuggestionContext",
    "SuggestionModel",
]
