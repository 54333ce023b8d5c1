from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DecodeOptions(_message.Message):
    __slots__ = ("beam_size", "length_penalty", "max_len_extra", "n_best", "return_scores", "split_sentences", "normalize_case", "protect_spans")
    BEAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    LENGTH_PENALTY_FIELD_NUMBER: _ClassVar[int]
    MAX_LEN_EXTRA_FIELD_NUMBER: _ClassVar[int]
    N_BEST_FIELD_NUMBER: _ClassVar[int]
    RETURN_SCORES_FIELD_NUMBER: _ClassVar[int]
    SPLIT_SENTENCES_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_CASE_FIELD_NUMBER: _ClassVar[int]
    PROTECT_SPANS_FIELD_NUMBER: _ClassVar[int]
    beam_size: int
    length_penalty: float
    max_len_extra: int
    n_best: int
    return_scores: bool
    split_sentences: bool
    normalize_case: bool
    protect_spans: bool
    def __init__(self, beam_size: _Optional[int] = ..., length_penalty: _Optional[float] = ..., max_len_extra: _Optional[int] = ..., n_best: _Optional[int] = ..., return_scores: _Optional[bool] = ..., split_sentences: _Optional[bool] = ..., normalize_case: _Optional[bool] = ..., protect_spans: _Optional[bool] = ...) -> None: ...

class TranslateRequest(_message.Message):
    __slots__ = ("texts", "options", "model", "version")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    options: DecodeOptions
    model: str
    version: int
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., options: _Optional[_Union[DecodeOptions, _Mapping]] = ..., model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class Hypothesis(_message.Message):
    __slots__ = ("text", "tokens", "score", "normalized_score")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_SCORE_FIELD_NUMBER: _ClassVar[int]
    text: str
    tokens: int
    score: float
    normalized_score: float
    def __init__(self, text: _Optional[str] = ..., tokens: _Optional[int] = ..., score: _Optional[float] = ..., normalized_score: _Optional[float] = ...) -> None: ...

class Translation(_message.Message):
    __slots__ = ("hypotheses",)
    HYPOTHESES_FIELD_NUMBER: _ClassVar[int]
    hypotheses: _containers.RepeatedCompositeFieldContainer[Hypothesis]
    def __init__(self, hypotheses: _Optional[_Iterable[_Union[Hypothesis, _Mapping]]] = ...) -> None: ...

class TranslateResponse(_message.Message):
    __slots__ = ("translations",)
    TRANSLATIONS_FIELD_NUMBER: _ClassVar[int]
    translations: _containers.RepeatedCompositeFieldContainer[Translation]
    def __init__(self, translations: _Optional[_Iterable[_Union[Translation, _Mapping]]] = ...) -> None: ...

class TranslateStreamRequest(_message.Message):
    __slots__ = ("id", "texts", "options", "model", "version")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    id: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    options: DecodeOptions
    model: str
    version: int
    def __init__(self, id: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ..., options: _Optional[_Union[DecodeOptions, _Mapping]] = ..., model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class TranslateStreamResponse(_message.Message):
    __slots__ = ("id", "response", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    response: TranslateResponse
    error: Error
    def __init__(self, id: _Optional[str] = ..., response: _Optional[_Union[TranslateResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelEntry(_message.Message):
    __slots__ = ("name", "versions", "serving_version", "src_lang", "tgt_lang", "state", "default_model")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    SRC_LANG_FIELD_NUMBER: _ClassVar[int]
    TGT_LANG_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: _containers.RepeatedScalarFieldContainer[int]
    serving_version: int
    src_lang: str
    tgt_lang: str
    state: str
    default_model: bool
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[_Iterable[int]] = ..., serving_version: _Optional[int] = ..., src_lang: _Optional[str] = ..., tgt_lang: _Optional[str] = ..., state: _Optional[str] = ..., default_model: _Optional[bool] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelEntry]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelEntry, _Mapping]]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "src_lang", "tgt_lang", "vocab_size", "bundle_sha256", "precision", "provider", "max_texts_per_request", "max_tokens_per_text", "max_beam_size", "default_options", "max_sentences_per_request")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SRC_LANG_FIELD_NUMBER: _ClassVar[int]
    TGT_LANG_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SHA256_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXTS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_TEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_BEAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_SENTENCES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    src_lang: str
    tgt_lang: str
    vocab_size: int
    bundle_sha256: str
    precision: str
    provider: str
    max_texts_per_request: int
    max_tokens_per_text: int
    max_beam_size: int
    default_options: DecodeOptions
    max_sentences_per_request: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., src_lang: _Optional[str] = ..., tgt_lang: _Optional[str] = ..., vocab_size: _Optional[int] = ..., bundle_sha256: _Optional[str] = ..., precision: _Optional[str] = ..., provider: _Optional[str] = ..., max_texts_per_request: _Optional[int] = ..., max_tokens_per_text: _Optional[int] = ..., max_beam_size: _Optional[int] = ..., default_options: _Optional[_Union[DecodeOptions, _Mapping]] = ..., max_sentences_per_request: _Optional[int] = ...) -> None: ...
