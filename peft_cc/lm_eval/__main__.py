"""`python -m peft_cc.lm_eval ARGS`: lm-eval's command line (the same arguments) with the `cc` model type added."""

from lm_eval.__main__ import cli_evaluate

from . import model as _model  # noqa: F401  (registers the `cc` model type)

if __name__ == "__main__":
    cli_evaluate()
