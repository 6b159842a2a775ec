"""Errors a user can cause. Each says in one line what is wrong; the CLI prints it and exits 2."""

from __future__ import annotations


class RankwiseError(Exception):
    """Base class: a problem with the user's input, reported without a traceback."""


class ModelNotFoundError(RankwiseError):
    """The model path does not exist or holds no loadable model."""


class PickleRefusedError(ModelNotFoundError):
    """The model's weights exist only as pickles, which rankwise never loads."""


class UnsupportedArchitectureError(RankwiseError):
    """No built-in target list for this architecture, and none was given."""


class RatioError(RankwiseError):
    """A ratio outside the open interval (0, 1)."""


class CalibrationError(RankwiseError):
    """Calibration text missing, empty, or too short for one window."""


class NonFiniteWeightsError(RankwiseError):
    """A targeted weight holds NaN or Inf."""


class OutputExistsError(RankwiseError):
    """The output directory exists and --overwrite was not given."""


class OutputNotWritableError(RankwiseError):
    """The output directory's parent cannot be written."""


class RecipeError(RankwiseError):
    """A recipe file that does not parse or does not validate."""


class TaskError(RankwiseError):
    """lm-evaluation-harness is missing, a task is unknown, or the model has no tokenizer."""
