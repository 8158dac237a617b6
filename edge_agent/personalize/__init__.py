"""The agent's suggestion path: a trigger event in, a suggestion out, in about a millisecond.

``Personalizer`` is the component ``build_components`` wires in; ``ModelStore`` is the model
directory layout the ``edge-agent model`` commands share with it. See README.md here.
"""

from edge_agent.personalize.model_store import ModelState, ModelStore, ModelStoreError
from edge_agent.personalize.personalizer import Personalizer

__all__ = ["ModelState", "ModelStore", "ModelStoreError", "Personalizer"]
