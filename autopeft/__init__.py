"""autopeft: search LoRA-family adapter configurations and export the best as a ready PEFT adapter.

The public plugin API is re-exported here: :class:`Variant`, :class:`AttachContext`, :class:`ModelSource`,
:class:`Corpus`, the parameter types and :func:`shared`, and the ``hookimpl`` marker.
"""

from autopeft.hookspecs import AttachContext, Corpus, ModelSource, Variant, hookimpl
from autopeft.space import CategoricalParam, FloatParam, IntParam, shared

__version__ = "0.1.0"

__all__ = [
    "AttachContext",
    "CategoricalParam",
    "Corpus",
    "FloatParam",
    "IntParam",
    "ModelSource",
    "Variant",
    "__version__",
    "hookimpl",
    "shared",
]
