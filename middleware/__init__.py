"""ragkv.middleware (see DESIGN.md). Imported as ``ragkv.middleware``.

transformers is an optional extra (``ragkv[model]``): it is imported only where a model is touched
(building a ``DynamicCache``, sampling warpers), never at import time of this package.
"""
from __future__ import annotations

if not __name__.startswith("ragkv."):
    raise ImportError("import this package as ragkv.middleware, not as a bare 'middleware' (see DESIGN.md)")

from ragkv.middleware.adapter import ModelAdapter
from ragkv.middleware.blend import BlendConfig, BlendStrategy
from ragkv.middleware.chunking import ChunkCacher, ChunkingConfig, WarmReport
from ragkv.middleware.compress import CompressConfig, CompressStrategy
from ragkv.middleware.context import ChunkInfo, PreparedContext, PrepareRequest
from ragkv.middleware.controller import AutoConfig, AutoStrategy
from ragkv.middleware.engine import ContextEngine, EngineConfig
from ragkv.middleware.errors import ContextTooLong, UnsupportedModel
from ragkv.middleware.families import FAMILIES, SUPPORTED_ROPE_TYPES
from ragkv.middleware.generation import GenerationConfig, GenerationResult, TokenEvent, generate, stream
from ragkv.middleware.model_registry import DEFAULT_MODEL, LoadedModel, ModelInfo, load_model
from ragkv.middleware.prefix_cache import PrefixCache, PrefixCacheConfig
from ragkv.middleware.prompt_template import ChatTurn, DocumentLayout, PromptTemplate
from ragkv.middleware.rope import rotate_keys
from ragkv.middleware.selective import HighDeviationSelector, RandomSelector, Selector, select_high_deviation
from ragkv.middleware.strategies import (
    FullStrategy,
    PrefixConfig,
    PrefixStrategy,
    ReuseStrategy,
    Strategy,
    make_strategy,
    register_strategy,
    strategy_names,
)

__all__ = [
    "DEFAULT_MODEL",
    "FAMILIES",
    "SUPPORTED_ROPE_TYPES",
    "AutoConfig",
    "AutoStrategy",
    "BlendConfig",
    "BlendStrategy",
    "ChatTurn",
    "ChunkCacher",
    "ChunkInfo",
    "ChunkingConfig",
    "CompressConfig",
    "CompressStrategy",
    "ContextEngine",
    "ContextTooLong",
    "DocumentLayout",
    "EngineConfig",
    "FullStrategy",
    "GenerationConfig",
    "GenerationResult",
    "HighDeviationSelector",
    "LoadedModel",
    "ModelAdapter",
    "ModelInfo",
    "PrefixCache",
    "PrefixCacheConfig",
    "PrefixConfig",
    "PrefixStrategy",
    "PrepareRequest",
    "PreparedContext",
    "PromptTemplate",
    "RandomSelector",
    "ReuseStrategy",
    "Selector",
    "Strategy",
    "TokenEvent",
    "UnsupportedModel",
    "WarmReport",
    "generate",
    "load_model",
    "make_strategy",
    "register_strategy",
    "rotate_keys",
    "select_high_deviation",
    "strategy_names",
    "stream",
]
