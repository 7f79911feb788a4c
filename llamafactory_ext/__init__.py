"""llamafactory_ext: the glue that turns paper→review data into fine-tuned reviewer models
with LLaMA-Factory (convert, register, train, merge, predict, judge)."""

__version__ = "0.1.0"

# The instruction every reviewer model is trained and prompted with. Verbatim: changing a
# single character changes what the models were trained on.
REVIEWER_INSTRUCTION = (
    "You are a professional machine learning conference reviewer who reviews a given paper and "
    "considers 4 criteria: ** importance and novelty **, ** potential reasons for acceptance **, "
    "** potential reasons for rejection **, and ** suggestions for improvement **. "
    "The given paper is as follows."
)


class UserError(Exception):
    """A problem the user can fix; the CLI prints it as `error: ...` (no traceback), exit 2."""
