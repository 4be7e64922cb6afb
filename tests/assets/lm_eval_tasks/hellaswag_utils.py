"""lm_eval's own hellaswag preprocessing, for the local task definition beside this file."""
from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401
