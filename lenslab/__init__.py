"""lenslab: a mechanistic-interpretability and steering workbench.

>>> import lenslab
>>> model = lenslab.load_model("zoo/induction-2l", device="cpu")
>>> task = lenslab.tasks.induction(model, n=4, seed=0)
"""

from __future__ import annotations

from lenslab import tasks
from lenslab._errors import LenslabError
from lenslab.models import ModelInfo, list_models, load_model
from lenslab.toolbox import model_name

__version__ = "0.1.0"
__all__ = ["LenslabError", "ModelInfo", "__version__", "list_models", "load_model", "model_name", "tasks"]
