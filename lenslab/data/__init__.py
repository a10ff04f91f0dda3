"""The zoo's procedural languages, as public modules: each generates the text a zoo model was
trained on and the prompts its tasks and evaluations use.

- `lenslab.data.ioi`: indirect-object identification prompts (zoo/ioi-4l, `lenslab.tasks.ioi`);
- `lenslab.data.refusal`: an instruction language with harmful-marker words (zoo/moe-refusal,
  `lenslab.tasks.refusal`);
- `lenslab.data.sentiment`: a review language with a steerable sentiment concept
  (zoo/steer-sentiment).

>>> from lenslab.data import sentiment
>>> sentiment.is_positive("the movie was lovely .")
True
"""

from lenslab.data import ioi, refusal, sentiment

__all__ = ["ioi", "refusal", "sentiment"]
