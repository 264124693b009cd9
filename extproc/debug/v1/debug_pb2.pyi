from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("model", "messages", "prompt", "max_tokens", "body", "path", "strategy", "user", "headers")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    model: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    prompt: str
    max_tokens: int
    body: str
    path: str
    strategy: str
    user: str
    headers: _containers.ScalarMap[str, str]
    def __init__(self, model: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., prompt: _Optional[str] = ..., max_tokens: _Optional[int] = ..., body: _Optional[str] = ..., path: _Optional[str] = ..., strategy: _Optional[str] = ..., user: _Optional[str] = ..., headers: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StrategyScore(_message.Message):
    __slots__ = ("strategy", "score")
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    strategy: str
    score: float
    def __init__(self, strategy: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("pod", "address", "score", "scores", "load", "in_flight", "sent_since_scrape", "prefix_match_blocks", "metrics_fresh", "best", "prefix_match_tokens", "prefix_precise")
    POD_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    SENT_SINCE_SCRAPE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_MATCH_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FRESH_FIELD_NUMBER: _ClassVar[int]
    BEST_FIELD_NUMBER: _ClassVar[int]
    PREFIX_MATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_PRECISE_FIELD_NUMBER: _ClassVar[int]
    pod: str
    address: str
    score: float
    scores: _containers.RepeatedCompositeFieldContainer[StrategyScore]
    load: float
    in_flight: int
    sent_since_scrape: int
    prefix_match_blocks: int
    metrics_fresh: bool
    best: bool
    prefix_match_tokens: int
    prefix_precise: bool
    def __init__(self, pod: _Optional[str] = ..., address: _Optional[str] = ..., score: _Optional[float] = ..., scores: _Optional[_Iterable[_Union[StrategyScore, _Mapping]]] = ..., load: _Optional[float] = ..., in_flight: _Optional[int] = ..., sent_since_scrape: _Optional[int] = ..., prefix_match_blocks: _Optional[int] = ..., metrics_fresh: _Optional[bool] = ..., best: _Optional[bool] = ..., prefix_match_tokens: _Optional[int] = ..., prefix_precise: _Optional[bool] = ...) -> None: ...

class Fallback(_message.Message):
    __slots__ = ("strategy", "reason", "used")
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    strategy: str
    reason: str
    used: str
    def __init__(self, strategy: _Optional[str] = ..., reason: _Optional[str] = ..., used: _Optional[str] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("model", "path", "strategy", "routed_by_model", "pod", "address", "candidates", "fallbacks", "prompt_blocks", "prompt_length", "uses_prefix", "user", "request_id", "upstream_headers", "held_requests")
    class UpstreamHeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    ROUTED_BY_MODEL_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    USES_PREFIX_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_HEADERS_FIELD_NUMBER: _ClassVar[int]
    HELD_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    path: str
    strategy: str
    routed_by_model: bool
    pod: str
    address: str
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    fallbacks: _containers.RepeatedCompositeFieldContainer[Fallback]
    prompt_blocks: int
    prompt_length: int
    uses_prefix: bool
    user: str
    request_id: str
    upstream_headers: _containers.ScalarMap[str, str]
    held_requests: int
    def __init__(self, model: _Optional[str] = ..., path: _Optional[str] = ..., strategy: _Optional[str] = ..., routed_by_model: _Optional[bool] = ..., pod: _Optional[str] = ..., address: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., fallbacks: _Optional[_Iterable[_Union[Fallback, _Mapping]]] = ..., prompt_blocks: _Optional[int] = ..., prompt_length: _Optional[int] = ..., uses_prefix: _Optional[bool] = ..., user: _Optional[str] = ..., request_id: _Optional[str] = ..., upstream_headers: _Optional[_Mapping[str, str]] = ..., held_requests: _Optional[int] = ...) -> None: ...

class ListPodsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class MetricsWindow(_message.Message):
    __slots__ = ("seconds", "requests", "prompt_tokens", "generation_tokens", "queue_seconds", "ttft_seconds", "e2e_seconds", "mean_running")
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TTFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    E2E_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEAN_RUNNING_FIELD_NUMBER: _ClassVar[int]
    seconds: float
    requests: float
    prompt_tokens: float
    generation_tokens: float
    queue_seconds: float
    ttft_seconds: float
    e2e_seconds: float
    mean_running: float
    def __init__(self, seconds: _Optional[float] = ..., requests: _Optional[float] = ..., prompt_tokens: _Optional[float] = ..., generation_tokens: _Optional[float] = ..., queue_seconds: _Optional[float] = ..., ttft_seconds: _Optional[float] = ..., e2e_seconds: _Optional[float] = ..., mean_running: _Optional[float] = ...) -> None: ...

class PodMetrics(_message.Message):
    __slots__ = ("running", "waiting", "kv_cache_usage", "prefix_cache_queries", "prefix_cache_hits", "prompt_tokens", "generation_tokens", "block_size", "num_gpu_blocks", "running_adapters", "waiting_adapters", "window")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_USAGE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_QUERIES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_GPU_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    WAITING_ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    running: float
    waiting: float
    kv_cache_usage: float
    prefix_cache_queries: float
    prefix_cache_hits: float
    prompt_tokens: float
    generation_tokens: float
    block_size: int
    num_gpu_blocks: int
    running_adapters: _containers.RepeatedScalarFieldContainer[str]
    waiting_adapters: _containers.RepeatedScalarFieldContainer[str]
    window: MetricsWindow
    def __init__(self, running: _Optional[float] = ..., waiting: _Optional[float] = ..., kv_cache_usage: _Optional[float] = ..., prefix_cache_queries: _Optional[float] = ..., prefix_cache_hits: _Optional[float] = ..., prompt_tokens: _Optional[float] = ..., generation_tokens: _Optional[float] = ..., block_size: _Optional[int] = ..., num_gpu_blocks: _Optional[int] = ..., running_adapters: _Optional[_Iterable[str]] = ..., waiting_adapters: _Optional[_Iterable[str]] = ..., window: _Optional[_Union[MetricsWindow, _Mapping]] = ...) -> None: ...

class Pod(_message.Message):
    __slots__ = ("name", "address", "model", "adapters", "ready", "namespace", "metrics_url", "in_flight", "sent_since_scrape", "load", "metrics", "metrics_age_seconds", "metrics_fresh", "coldstart_seconds", "ready_for_seconds", "prefix_blocks", "ejected", "ejected_for_seconds", "ejection_reason", "kv_events")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    METRICS_URL_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    SENT_SINCE_SCRAPE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    METRICS_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FRESH_FIELD_NUMBER: _ClassVar[int]
    COLDSTART_SECONDS_FIELD_NUMBER: _ClassVar[int]
    READY_FOR_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    EJECTED_FIELD_NUMBER: _ClassVar[int]
    EJECTED_FOR_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EJECTION_REASON_FIELD_NUMBER: _ClassVar[int]
    KV_EVENTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    model: str
    adapters: _containers.RepeatedScalarFieldContainer[str]
    ready: bool
    namespace: str
    metrics_url: str
    in_flight: int
    sent_since_scrape: int
    load: float
    metrics: PodMetrics
    metrics_age_seconds: float
    metrics_fresh: bool
    coldstart_seconds: float
    ready_for_seconds: float
    prefix_blocks: int
    ejected: bool
    ejected_for_seconds: float
    ejection_reason: str
    kv_events: KvEvents
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., model: _Optional[str] = ..., adapters: _Optional[_Iterable[str]] = ..., ready: _Optional[bool] = ..., namespace: _Optional[str] = ..., metrics_url: _Optional[str] = ..., in_flight: _Optional[int] = ..., sent_since_scrape: _Optional[int] = ..., load: _Optional[float] = ..., metrics: _Optional[_Union[PodMetrics, _Mapping]] = ..., metrics_age_seconds: _Optional[float] = ..., metrics_fresh: _Optional[bool] = ..., coldstart_seconds: _Optional[float] = ..., ready_for_seconds: _Optional[float] = ..., prefix_blocks: _Optional[int] = ..., ejected: _Optional[bool] = ..., ejected_for_seconds: _Optional[float] = ..., ejection_reason: _Optional[str] = ..., kv_events: _Optional[_Union[KvEvents, _Mapping]] = ...) -> None: ...

class KvEvents(_message.Message):
    __slots__ = ("endpoint", "connected", "precise", "lag_seconds", "messages", "gaps", "resyncs", "blocks", "block_size", "error")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    PRECISE_FIELD_NUMBER: _ClassVar[int]
    LAG_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    GAPS_FIELD_NUMBER: _ClassVar[int]
    RESYNCS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    connected: bool
    precise: bool
    lag_seconds: float
    messages: int
    gaps: int
    resyncs: int
    blocks: int
    block_size: int
    error: str
    def __init__(self, endpoint: _Optional[str] = ..., connected: _Optional[bool] = ..., precise: _Optional[bool] = ..., lag_seconds: _Optional[float] = ..., messages: _Optional[int] = ..., gaps: _Optional[int] = ..., resyncs: _Optional[int] = ..., blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class ListPodsResponse(_message.Message):
    __slots__ = ("pods",)
    PODS_FIELD_NUMBER: _ClassVar[int]
    pods: _containers.RepeatedCompositeFieldContainer[Pod]
    def __init__(self, pods: _Optional[_Iterable[_Union[Pod, _Mapping]]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Model(_message.Message):
    __slots__ = ("id", "parent", "ready_pods", "pods", "in_flight", "held_requests")
    ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    READY_PODS_FIELD_NUMBER: _ClassVar[int]
    PODS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    HELD_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    parent: str
    ready_pods: int
    pods: int
    in_flight: int
    held_requests: int
    def __init__(self, id: _Optional[str] = ..., parent: _Optional[str] = ..., ready_pods: _Optional[int] = ..., pods: _Optional[int] = ..., in_flight: _Optional[int] = ..., held_requests: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...
