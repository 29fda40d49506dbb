"""ragkv.integrations (see DESIGN.md). Imported as ``ragkv.integrations``.

The doors to ragkv, each in its own module so that an optional dependency is imported only by the door that
needs it (and fails naming the extra to install):

- ``runtime``: ``RagRuntime`` (model + store + engine behind one lock), shared by every door below.
- ``service`` / ``service_app``: the REST service (``ragkv serve``; fastapi + uvicorn, ``ragkv[service]``).
- ``client``: ``RagkvClient``, the HTTP client of that service (httpx).
- ``cli``: the ``ragkv`` command line (serve, warm, ask, stats, bench, demo).
- ``langchain_adapter``: ``RagkvRetriever`` and ``ChatRagkv`` (``ragkv[langchain]``).
- ``llamaindex_adapter``: ``RagkvLlamaRetriever`` and ``RagkvLLM`` (``ragkv[llamaindex]``).
- ``faiss_retriever``: ``FaissIndex``, the built-in retriever (``ragkv[faiss]``).
- ``models``: the bundled model, local HF models, and the labelled random-initialised stand-in.
"""
from __future__ import annotations

if not __name__.startswith("ragkv."):
    raise ImportError("import this package as ragkv.integrations, not as a bare 'integrations' (see DESIGN.md)")
