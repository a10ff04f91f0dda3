"""The zoo's procedural languages, as public modules: each generates the text a zoo model was
trained on and the prompts its tasks and evaluations use.

- `lenslab.data.ioi`: indirect-object identification prompts (zoo/ioi-4l, `lenslab.tasks.ioi`);
- `lenslab.data.refusal`: an instruction language with harmful-marker words (zoo/moe-refusal,
  `lenslab.tasks.refusal`);
- `lenslab.data.sentiment`: a review language with a steerable sentiment concept
  (zoo/steer-sentiment);
- `lenslab.data.english`: an English sentiment lexicon, its scorer and English prompts
  (zoo/english-4l).

`sentiment_data(model)` is the one place that says which of the two sentiment modules scores a
model's steering evaluation (its `is_positive`, `concept_rate`) and gives its seeded prompt sets
(`seeded_sets`): `english` for zoo/english-4l, `sentiment` for every other model.

>>> from lenslab.data import sentiment
>>> sentiment.is_positive("the movie was lovely .")
True
>>> sentiment_data("zoo/english-4l").__name__
'lenslab.data.english'
"""

from lenslab.data import english, ioi, refusal, sentiment

# model -> the data module of its sentiment concept (scorer and seeded prompt sets); others: sentiment
SENTIMENT_DATA = {"zoo/steer-sentiment": sentiment, "zoo/english-4l": english}


def sentiment_data(model: str):
    """The sentiment data module for model `model` (a zoo name, HF id or folder): `lenslab.data.english`
    for zoo/english-4l, `lenslab.data.sentiment` otherwise. Both have `words`, `counts`,
    `concept_rate`, `is_positive`, `prompts` and `seeded_sets`."""
    return SENTIMENT_DATA.get(str(model), sentiment)


__all__ = ["SENTIMENT_DATA", "english", "ioi", "refusal", "sentiment", "sentiment_data"]
