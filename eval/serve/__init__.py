"""``vlm serve``: a trained model behind OpenAI's chat-completions API, with a page to try it.

:func:`create_app` builds the ASGI app (``vlm.eval.serve.app``), :class:`Service` holds the
model and its continuously batched generation (``vlm.eval.serve.scheduler``), and the request
format and its checks live in ``vlm.eval.serve.api``.
"""

from vlm.eval.serve.api import APIError, Limits
from vlm.eval.serve.app import Service, create_app

__all__ = ["APIError", "Limits", "Service", "create_app"]
