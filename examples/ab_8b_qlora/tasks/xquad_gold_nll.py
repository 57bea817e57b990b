"""XQuAD's gold-answer negative log-likelihood: the task class of this folder's `xquad_gold_nll_<lang>` tasks.

Each question asks for one log-likelihood, that of its first gold answer after the `xquad_<lang>` task's own prompt
(same prompt, target and delimiter), and scores `answer_nll`: minus that log-likelihood divided by the answer's
number of tokens, in nats per token, lower is better. It needs no decoding (one forward pass per question, where
the generative task decodes up to 40 tokens) and moves long before exact match does, which makes it the recipe's
precise reading on XQuAD.

The tokens are those of the scored continuation (the delimiter and the answer) tokenised alone, with the evaluated
model's tokenizer: the task metadata names it (`tokenizer`, else `pretrained`, with `revision` and
`trust_remote_code`), and lm-eval's command line puts the `--model_args` there. Both systems of a paired comparison
share the tokenizer, so each item's divisor is the same on both sides.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from lm_eval.api.registry import metric_registry, register_metric
from lm_eval.api.task import ConfigurableTask

METRIC = "answer_nll"

# Registered so that lm-eval finds the metric by name instead of searching the `evaluate` library (a network call);
# the scores themselves come from `GoldAnswerNLL.process_results` and are averaged.
if METRIC not in metric_registry:

    @register_metric(metric=METRIC, higher_is_better=False, output_type="loglikelihood", aggregation="mean")
    def answer_nll(items: list[float]) -> list[float]:
        """A pass-through: the per-question values are lm-eval's items."""
        return items


@functools.lru_cache(maxsize=4)
def _load_tokenizer(name: str, revision: str | None, trust_remote_code: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)


def metadata_tokenizer(metadata: Mapping | None):
    """The evaluated model's tokenizer, named by the task metadata (`tokenizer`, else `pretrained`).

    Raises:
        ValueError: the metadata names no model.
    """
    metadata = metadata or {}
    name = metadata.get("tokenizer") or metadata.get("pretrained")
    if not isinstance(name, str) or not name:
        raise ValueError(
            "The xquad_gold_nll_* tasks count answer tokens with the evaluated model's tokenizer, which they read "
            "from the task metadata (`tokenizer`, else `pretrained`). lm-eval's command line puts --model_args there; "
            "from Python, give TaskManager(metadata={'pretrained': <model>})."
        )
    return _load_tokenizer(name, metadata.get("revision"), bool(metadata.get("trust_remote_code", False)))


class GoldAnswerNLL(ConfigurableTask):
    """A `loglikelihood` task over XQuAD whose score is `answer_nll` (see the module docstring)."""

    def __init__(self, config: dict) -> None:
        # lm-eval hands a `class:` task its whole configuration, `class` included, which TaskConfig does not take.
        super().__init__(config={key: value for key, value in config.items() if key != "class"})

    def process_results(self, doc: dict, results: list) -> dict[str, float]:
        """`answer_nll` of one question from its single `(log-likelihood, is_greedy)` result."""
        ((log_likelihood, _),) = results
        continuation = self.config.target_delimiter + str(self.doc_to_target(doc))
        tokenizer = metadata_tokenizer(self.config.metadata)
        tokens = len(tokenizer(continuation, add_special_tokens=False)["input_ids"])
        if tokens == 0:
            raise ValueError(f"{self.config.task}: the gold answer {continuation!r} has no token.")
        return {METRIC: -float(log_likelihood) / tokens}
