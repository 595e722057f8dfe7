"""What a patching metric receives: a language model's logits, or else the model's output.

Every patching function calls ``metric(scored)`` where ``scored`` is:

- the logits ``[batch, pos, vocab]`` when the model's output is a tensor, has a
  ``.logits`` tensor (a Hugging Face ``*ForCausalLM``, a TransformerLens model), or is
  a tuple whose first element is a tensor (that element);
- otherwise the model's output itself, e.g. the ``BaseModelOutputWithPooling...`` of a
  headless ``BertModel``, so that the metric reads ``out.last_hidden_state`` or
  ``out.pooler_output``.

Either way it holds only the rows of one experiment (one copy of the batch).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..runtime.inputs import slice_output


def scored(output: Any) -> Any:
    """The value a metric scores: the logits in ``output`` if it has them, else ``output``."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    return output


def experiment(value: Any, e: int, batch: int) -> Any:
    """Experiment ``e``'s rows of ``value`` (a tensor or a model output): one batch copy."""
    return slice_output(value, slice(e * batch, (e + 1) * batch))
