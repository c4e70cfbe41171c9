from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    INT8: _ClassVar[DType]
    INT4: _ClassVar[DType]
    INT4_HADAMARD: _ClassVar[DType]
    INT6_HADAMARD: _ClassVar[DType]
    INT8_HADAMARD: _ClassVar[DType]
    INT2_HADAMARD: _ClassVar[DType]
    INT3_HADAMARD: _ClassVar[DType]

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_NONE: _ClassVar[Compression]
    LZ4: _ClassVar[Compression]
    ZSTD: _ClassVar[Compression]

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    SFT: _ClassVar[Mode]
    SL: _ClassVar[Mode]

class SvdInit(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SVD_INIT_PLAIN: _ClassVar[SvdInit]
    SVD_INIT_ACTIVATION_AWARE: _ClassVar[SvdInit]
    SVD_INIT_RESIDUAL_AWARE: _ClassVar[SvdInit]

class Factorise(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FFN_OUTPUT: _ClassVar[Factorise]
    FFN_INPUT: _ClassVar[Factorise]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
INT8: DType
INT4: DType
INT4_HADAMARD: DType
INT6_HADAMARD: DType
INT8_HADAMARD: DType
INT2_HADAMARD: DType
INT3_HADAMARD: DType
COMPRESSION_NONE: Compression
LZ4: Compression
ZSTD: Compression
MODE_UNSPECIFIED: Mode
SFT: Mode
SL: Mode
SVD_INIT_PLAIN: SvdInit
SVD_INIT_ACTIVATION_AWARE: SvdInit
SVD_INIT_RESIDUAL_AWARE: SvdInit
FFN_OUTPUT: Factorise
FFN_INPUT: Factorise

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "compression", "scale", "scales", "group", "group_scales", "outlier_rows", "outliers")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    GROUP_SCALES_FIELD_NUMBER: _ClassVar[int]
    OUTLIER_ROWS_FIELD_NUMBER: _ClassVar[int]
    OUTLIERS_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    compression: Compression
    scale: float
    scales: _containers.RepeatedScalarFieldContainer[float]
    group: int
    group_scales: bytes
    outlier_rows: _containers.RepeatedScalarFieldContainer[int]
    outliers: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., compression: _Optional[_Union[Compression, str]] = ..., scale: _Optional[float] = ..., scales: _Optional[_Iterable[float]] = ..., group: _Optional[int] = ..., group_scales: _Optional[bytes] = ..., outlier_rows: _Optional[_Iterable[int]] = ..., outliers: _Optional[bytes] = ...) -> None: ...

class SessionConfig(_message.Message):
    __slots__ = ("model", "mode", "split_layer", "rank", "num_labels", "wire_dtype", "compression", "lr", "weight_decay", "warmup_steps", "total_steps", "seed", "max_batch_size", "max_seq_len", "task", "factor_lr", "lora_rank", "lora_alpha", "lora_targets", "label_private", "tail_layers", "svd_init", "factorise", "grad_wire_dtype", "stochastic_rounding", "down_wire_dtype", "forward_only", "side_width", "delta_cache_bytes", "delta_base_dtype", "delta_dtype")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SPLIT_LAYER_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    NUM_LABELS_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    FACTOR_LR_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    LORA_TARGETS_FIELD_NUMBER: _ClassVar[int]
    LABEL_PRIVATE_FIELD_NUMBER: _ClassVar[int]
    TAIL_LAYERS_FIELD_NUMBER: _ClassVar[int]
    SVD_INIT_FIELD_NUMBER: _ClassVar[int]
    FACTORISE_FIELD_NUMBER: _ClassVar[int]
    GRAD_WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    STOCHASTIC_ROUNDING_FIELD_NUMBER: _ClassVar[int]
    DOWN_WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    FORWARD_ONLY_FIELD_NUMBER: _ClassVar[int]
    SIDE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    DELTA_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DELTA_BASE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    DELTA_DTYPE_FIELD_NUMBER: _ClassVar[int]
    model: str
    mode: Mode
    split_layer: int
    rank: int
    num_labels: int
    wire_dtype: DType
    compression: Compression
    lr: float
    weight_decay: float
    warmup_steps: int
    total_steps: int
    seed: int
    max_batch_size: int
    max_seq_len: int
    task: str
    factor_lr: float
    lora_rank: int
    lora_alpha: float
    lora_targets: _containers.RepeatedScalarFieldContainer[str]
    label_private: bool
    tail_layers: int
    svd_init: SvdInit
    factorise: Factorise
    grad_wire_dtype: DType
    stochastic_rounding: bool
    down_wire_dtype: DType
    forward_only: bool
    side_width: int
    delta_cache_bytes: int
    delta_base_dtype: DType
    delta_dtype: DType
    def __init__(self, model: _Optional[str] = ..., mode: _Optional[_Union[Mode, str]] = ..., split_layer: _Optional[int] = ..., rank: _Optional[int] = ..., num_labels: _Optional[int] = ..., wire_dtype: _Optional[_Union[DType, str]] = ..., compression: _Optional[_Union[Compression, str]] = ..., lr: _Optional[float] = ..., weight_decay: _Optional[float] = ..., warmup_steps: _Optional[int] = ..., total_steps: _Optional[int] = ..., seed: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., task: _Optional[str] = ..., factor_lr: _Optional[float] = ..., lora_rank: _Optional[int] = ..., lora_alpha: _Optional[float] = ..., lora_targets: _Optional[_Iterable[str]] = ..., label_private: bool = ..., tail_layers: _Optional[int] = ..., svd_init: _Optional[_Union[SvdInit, str]] = ..., factorise: _Optional[_Union[Factorise, str]] = ..., grad_wire_dtype: _Optional[_Union[DType, str]] = ..., stochastic_rounding: bool = ..., down_wire_dtype: _Optional[_Union[DType, str]] = ..., forward_only: bool = ..., side_width: _Optional[int] = ..., delta_cache_bytes: _Optional[int] = ..., delta_base_dtype: _Optional[_Union[DType, str]] = ..., delta_dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class DeltaRows(_message.Message):
    __slots__ = ("delta", "rows")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    delta: _containers.RepeatedScalarFieldContainer[bool]
    rows: Tensor
    def __init__(self, delta: _Optional[_Iterable[bool]] = ..., rows: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("config", "fingerprint", "session_id", "resume_steps", "inference_only", "cloud_sigma", "cloud_v", "pack_stream")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RESUME_STEPS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_ONLY_FIELD_NUMBER: _ClassVar[int]
    CLOUD_SIGMA_FIELD_NUMBER: _ClassVar[int]
    CLOUD_V_FIELD_NUMBER: _ClassVar[int]
    PACK_STREAM_FIELD_NUMBER: _ClassVar[int]
    config: SessionConfig
    fingerprint: str
    session_id: str
    resume_steps: _containers.RepeatedScalarFieldContainer[int]
    inference_only: bool
    cloud_sigma: Tensor
    cloud_v: Tensor
    pack_stream: bool
    def __init__(self, config: _Optional[_Union[SessionConfig, _Mapping]] = ..., fingerprint: _Optional[str] = ..., session_id: _Optional[str] = ..., resume_steps: _Optional[_Iterable[int]] = ..., inference_only: bool = ..., cloud_sigma: _Optional[_Union[Tensor, _Mapping]] = ..., cloud_v: _Optional[_Union[Tensor, _Mapping]] = ..., pack_stream: bool = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("session_id", "fingerprint", "edge_factor", "next_step", "restored", "next_micro", "tail_sigma", "tail_v", "delta_cache_bytes", "stream_packed")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    EDGE_FACTOR_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEP_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FIELD_NUMBER: _ClassVar[int]
    NEXT_MICRO_FIELD_NUMBER: _ClassVar[int]
    TAIL_SIGMA_FIELD_NUMBER: _ClassVar[int]
    TAIL_V_FIELD_NUMBER: _ClassVar[int]
    DELTA_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STREAM_PACKED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    fingerprint: str
    edge_factor: Tensor
    next_step: int
    restored: bool
    next_micro: int
    tail_sigma: Tensor
    tail_v: Tensor
    delta_cache_bytes: int
    stream_packed: bool
    def __init__(self, session_id: _Optional[str] = ..., fingerprint: _Optional[str] = ..., edge_factor: _Optional[_Union[Tensor, _Mapping]] = ..., next_step: _Optional[int] = ..., restored: bool = ..., next_micro: _Optional[int] = ..., tail_sigma: _Optional[_Union[Tensor, _Mapping]] = ..., tail_v: _Optional[_Union[Tensor, _Mapping]] = ..., delta_cache_bytes: _Optional[int] = ..., stream_packed: bool = ...) -> None: ...

class TrainStep(_message.Message):
    __slots__ = ("step", "activations", "lengths", "labels", "targets", "micro", "micro_count", "step_examples", "example_keys", "delta")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    MICRO_FIELD_NUMBER: _ClassVar[int]
    MICRO_COUNT_FIELD_NUMBER: _ClassVar[int]
    STEP_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_KEYS_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    step: int
    activations: Tensor
    lengths: _containers.RepeatedScalarFieldContainer[int]
    labels: _containers.RepeatedScalarFieldContainer[int]
    targets: _containers.RepeatedScalarFieldContainer[float]
    micro: int
    micro_count: int
    step_examples: int
    example_keys: _containers.RepeatedScalarFieldContainer[bytes]
    delta: DeltaRows
    def __init__(self, step: _Optional[int] = ..., activations: _Optional[_Union[Tensor, _Mapping]] = ..., lengths: _Optional[_Iterable[int]] = ..., labels: _Optional[_Iterable[int]] = ..., targets: _Optional[_Iterable[float]] = ..., micro: _Optional[int] = ..., micro_count: _Optional[int] = ..., step_examples: _Optional[int] = ..., example_keys: _Optional[_Iterable[bytes]] = ..., delta: _Optional[_Union[DeltaRows, _Mapping]] = ...) -> None: ...

class TrainReply(_message.Message):
    __slots__ = ("step", "loss", "grad", "micro")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    MICRO_FIELD_NUMBER: _ClassVar[int]
    step: int
    loss: float
    grad: Tensor
    micro: int
    def __init__(self, step: _Optional[int] = ..., loss: _Optional[float] = ..., grad: _Optional[_Union[Tensor, _Mapping]] = ..., micro: _Optional[int] = ...) -> None: ...

class EvalStep(_message.Message):
    __slots__ = ("batch", "activations", "lengths")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    batch: int
    activations: Tensor
    lengths: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, batch: _Optional[int] = ..., activations: _Optional[_Union[Tensor, _Mapping]] = ..., lengths: _Optional[_Iterable[int]] = ...) -> None: ...

class EvalReply(_message.Message):
    __slots__ = ("batch", "logits", "activations", "side")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    SIDE_FIELD_NUMBER: _ClassVar[int]
    batch: int
    logits: Tensor
    activations: Tensor
    side: Tensor
    def __init__(self, batch: _Optional[int] = ..., logits: _Optional[_Union[Tensor, _Mapping]] = ..., activations: _Optional[_Union[Tensor, _Mapping]] = ..., side: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ForwardUp(_message.Message):
    __slots__ = ("step", "activations", "lengths", "example_keys", "delta")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_KEYS_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    step: int
    activations: Tensor
    lengths: _containers.RepeatedScalarFieldContainer[int]
    example_keys: _containers.RepeatedScalarFieldContainer[bytes]
    delta: DeltaRows
    def __init__(self, step: _Optional[int] = ..., activations: _Optional[_Union[Tensor, _Mapping]] = ..., lengths: _Optional[_Iterable[int]] = ..., example_keys: _Optional[_Iterable[bytes]] = ..., delta: _Optional[_Union[DeltaRows, _Mapping]] = ...) -> None: ...

class ForwardDown(_message.Message):
    __slots__ = ("step", "activations", "delta")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    step: int
    activations: Tensor
    delta: DeltaRows
    def __init__(self, step: _Optional[int] = ..., activations: _Optional[_Union[Tensor, _Mapping]] = ..., delta: _Optional[_Union[DeltaRows, _Mapping]] = ...) -> None: ...

class GradientUp(_message.Message):
    __slots__ = ("step", "grad")
    STEP_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    step: int
    grad: Tensor
    def __init__(self, step: _Optional[int] = ..., grad: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class GradientDown(_message.Message):
    __slots__ = ("step", "grad")
    STEP_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    step: int
    grad: Tensor
    def __init__(self, step: _Optional[int] = ..., grad: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Checkpoint(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class CheckpointDone(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class CloseSession(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FetchWeights(_message.Message):
    __slots__ = ("chunk",)
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    chunk: int
    def __init__(self, chunk: _Optional[int] = ...) -> None: ...

class WeightsChunk(_message.Message):
    __slots__ = ("chunk", "chunks", "data", "size", "sha256")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    chunk: int
    chunks: int
    data: bytes
    size: int
    sha256: str
    def __init__(self, chunk: _Optional[int] = ..., chunks: _Optional[int] = ..., data: _Optional[bytes] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class Forget(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Forgotten(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SessionClosed(_message.Message):
    __slots__ = ("steps",)
    STEPS_FIELD_NUMBER: _ClassVar[int]
    steps: int
    def __init__(self, steps: _Optional[int] = ...) -> None: ...

class DecodeStep(_message.Message):
    __slots__ = ("position", "activations")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    position: int
    activations: Tensor
    def __init__(self, position: _Optional[int] = ..., activations: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class DecodeReply(_message.Message):
    __slots__ = ("position", "activations", "cached", "side")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    SIDE_FIELD_NUMBER: _ClassVar[int]
    position: int
    activations: Tensor
    cached: int
    side: Tensor
    def __init__(self, position: _Optional[int] = ..., activations: _Optional[_Union[Tensor, _Mapping]] = ..., cached: _Optional[int] = ..., side: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class EdgeMessage(_message.Message):
    __slots__ = ("open", "train", "eval", "close", "checkpoint", "fetch", "forget", "forward_up", "gradient_up", "decode", "packed")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    FETCH_FIELD_NUMBER: _ClassVar[int]
    FORGET_FIELD_NUMBER: _ClassVar[int]
    FORWARD_UP_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_UP_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    train: TrainStep
    eval: EvalStep
    close: CloseSession
    checkpoint: Checkpoint
    fetch: FetchWeights
    forget: Forget
    forward_up: ForwardUp
    gradient_up: GradientUp
    decode: DecodeStep
    packed: bytes
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., train: _Optional[_Union[TrainStep, _Mapping]] = ..., eval: _Optional[_Union[EvalStep, _Mapping]] = ..., close: _Optional[_Union[CloseSession, _Mapping]] = ..., checkpoint: _Optional[_Union[Checkpoint, _Mapping]] = ..., fetch: _Optional[_Union[FetchWeights, _Mapping]] = ..., forget: _Optional[_Union[Forget, _Mapping]] = ..., forward_up: _Optional[_Union[ForwardUp, _Mapping]] = ..., gradient_up: _Optional[_Union[GradientUp, _Mapping]] = ..., decode: _Optional[_Union[DecodeStep, _Mapping]] = ..., packed: _Optional[bytes] = ...) -> None: ...

class CloudMessage(_message.Message):
    __slots__ = ("opened", "train", "eval", "closed", "checkpointed", "weights", "forgotten", "forward_down", "gradient_down", "decoded", "packed")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTED_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    FORGOTTEN_FIELD_NUMBER: _ClassVar[int]
    FORWARD_DOWN_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_DOWN_FIELD_NUMBER: _ClassVar[int]
    DECODED_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    opened: SessionOpened
    train: TrainReply
    eval: EvalReply
    closed: SessionClosed
    checkpointed: CheckpointDone
    weights: WeightsChunk
    forgotten: Forgotten
    forward_down: ForwardDown
    gradient_down: GradientDown
    decoded: DecodeReply
    packed: bytes
    def __init__(self, opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., train: _Optional[_Union[TrainReply, _Mapping]] = ..., eval: _Optional[_Union[EvalReply, _Mapping]] = ..., closed: _Optional[_Union[SessionClosed, _Mapping]] = ..., checkpointed: _Optional[_Union[CheckpointDone, _Mapping]] = ..., weights: _Optional[_Union[WeightsChunk, _Mapping]] = ..., forgotten: _Optional[_Union[Forgotten, _Mapping]] = ..., forward_down: _Optional[_Union[ForwardDown, _Mapping]] = ..., gradient_down: _Optional[_Union[GradientDown, _Mapping]] = ..., decoded: _Optional[_Union[DecodeReply, _Mapping]] = ..., packed: _Optional[bytes] = ...) -> None: ...
