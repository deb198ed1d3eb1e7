from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    ENCODING_FP32: _ClassVar[Encoding]
    ENCODING_BF16: _ClassVar[Encoding]
    ENCODING_FP16: _ClassVar[Encoding]
    ENCODING_INT8_BLOCK: _ClassVar[Encoding]

class PushOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PUSH_OUTCOME_UNSPECIFIED: _ClassVar[PushOutcome]
    PUSH_OUTCOME_COMMITTED: _ClassVar[PushOutcome]
    PUSH_OUTCOME_ABORTED: _ClassVar[PushOutcome]
    PUSH_OUTCOME_UNKNOWN: _ClassVar[PushOutcome]

class NodeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATE_UNSPECIFIED: _ClassVar[NodeState]
    NODE_STATE_STARTING: _ClassVar[NodeState]
    NODE_STATE_TRAINING: _ClassVar[NodeState]
    NODE_STATE_DRAINING: _ClassVar[NodeState]
    NODE_STATE_FINISHED: _ClassVar[NodeState]
    NODE_STATE_LEFT: _ClassVar[NodeState]
ENCODING_UNSPECIFIED: Encoding
ENCODING_FP32: Encoding
ENCODING_BF16: Encoding
ENCODING_FP16: Encoding
ENCODING_INT8_BLOCK: Encoding
PUSH_OUTCOME_UNSPECIFIED: PushOutcome
PUSH_OUTCOME_COMMITTED: PushOutcome
PUSH_OUTCOME_ABORTED: PushOutcome
PUSH_OUTCOME_UNKNOWN: PushOutcome
NODE_STATE_UNSPECIFIED: NodeState
NODE_STATE_STARTING: NodeState
NODE_STATE_TRAINING: NodeState
NODE_STATE_DRAINING: NodeState
NODE_STATE_FINISHED: NodeState
NODE_STATE_LEFT: NodeState

class StateHeader(_message.Message):
    __slots__ = ("sender_id", "message_id", "weight", "fingerprint", "encoding", "payload_bytes", "sender_step", "cluster", "protocol_version", "sender_address")
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    SENDER_STEP_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SENDER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    sender_id: str
    message_id: int
    weight: float
    fingerprint: bytes
    encoding: Encoding
    payload_bytes: int
    sender_step: int
    cluster: str
    protocol_version: int
    sender_address: str
    def __init__(self, sender_id: _Optional[str] = ..., message_id: _Optional[int] = ..., weight: _Optional[float] = ..., fingerprint: _Optional[bytes] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., payload_bytes: _Optional[int] = ..., sender_step: _Optional[int] = ..., cluster: _Optional[str] = ..., protocol_version: _Optional[int] = ..., sender_address: _Optional[str] = ...) -> None: ...

class StateChunk(_message.Message):
    __slots__ = ("header", "offset", "data", "crc32")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    header: StateHeader
    offset: int
    data: bytes
    crc32: int
    def __init__(self, header: _Optional[_Union[StateHeader, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32: _Optional[int] = ...) -> None: ...

class StateMessage(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[StateChunk]
    def __init__(self, chunks: _Optional[_Iterable[_Union[StateChunk, _Mapping]]] = ...) -> None: ...

class PushAck(_message.Message):
    __slots__ = ("receiver_id", "duplicate")
    RECEIVER_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    receiver_id: str
    duplicate: bool
    def __init__(self, receiver_id: _Optional[str] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("node_id", "cluster", "fingerprint", "protocol_version", "address")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    cluster: str
    fingerprint: bytes
    protocol_version: int
    address: str
    def __init__(self, node_id: _Optional[str] = ..., cluster: _Optional[str] = ..., fingerprint: _Optional[bytes] = ..., protocol_version: _Optional[int] = ..., address: _Optional[str] = ...) -> None: ...

class PeerInfo(_message.Message):
    __slots__ = ("node_id", "address")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class HelloRequest(_message.Message):
    __slots__ = ("self", "cluster", "protocol_version", "peers", "draining", "closing")
    SELF_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    CLOSING_FIELD_NUMBER: _ClassVar[int]
    self: PeerInfo
    cluster: str
    protocol_version: int
    peers: _containers.RepeatedCompositeFieldContainer[PeerInfo]
    draining: bool
    closing: bool
    def __init__(self_, self: _Optional[_Union[PeerInfo, _Mapping]] = ..., cluster: _Optional[str] = ..., protocol_version: _Optional[int] = ..., peers: _Optional[_Iterable[_Union[PeerInfo, _Mapping]]] = ..., draining: _Optional[bool] = ..., closing: _Optional[bool] = ...) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("self", "cluster", "protocol_version", "peers", "step", "has_state", "accepting")
    SELF_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    HAS_STATE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTING_FIELD_NUMBER: _ClassVar[int]
    self: PeerInfo
    cluster: str
    protocol_version: int
    peers: _containers.RepeatedCompositeFieldContainer[PeerInfo]
    step: int
    has_state: bool
    accepting: bool
    def __init__(self_, self: _Optional[_Union[PeerInfo, _Mapping]] = ..., cluster: _Optional[str] = ..., protocol_version: _Optional[int] = ..., peers: _Optional[_Iterable[_Union[PeerInfo, _Mapping]]] = ..., step: _Optional[int] = ..., has_state: _Optional[bool] = ..., accepting: _Optional[bool] = ...) -> None: ...

class ResolveRequest(_message.Message):
    __slots__ = ("sender_id", "message_id")
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    sender_id: str
    message_id: int
    def __init__(self, sender_id: _Optional[str] = ..., message_id: _Optional[int] = ...) -> None: ...

class ResolveReply(_message.Message):
    __slots__ = ("outcome",)
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    outcome: PushOutcome
    def __init__(self, outcome: _Optional[_Union[PushOutcome, str]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PeerStatus(_message.Message):
    __slots__ = ("node_id", "address", "status", "last_seen_seconds")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    status: str
    last_seen_seconds: float
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., status: _Optional[str] = ..., last_seen_seconds: _Optional[float] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("node_id", "address", "cluster", "protocol_version", "state", "step", "steps_per_second", "uptime_seconds", "weight", "inbox_weight", "in_flight_weight", "in_flight_pushes", "weight_written_off", "founded_weight", "last_loss", "messages_sent", "messages_received", "messages_returned", "peers")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    INBOX_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_PUSHES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_WRITTEN_OFF_FIELD_NUMBER: _ClassVar[int]
    FOUNDED_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LAST_LOSS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_SENT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_RETURNED_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    cluster: str
    protocol_version: int
    state: NodeState
    step: int
    steps_per_second: float
    uptime_seconds: float
    weight: float
    inbox_weight: float
    in_flight_weight: float
    in_flight_pushes: int
    weight_written_off: float
    founded_weight: float
    last_loss: float
    messages_sent: int
    messages_received: int
    messages_returned: int
    peers: _containers.RepeatedCompositeFieldContainer[PeerStatus]
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., cluster: _Optional[str] = ..., protocol_version: _Optional[int] = ..., state: _Optional[_Union[NodeState, str]] = ..., step: _Optional[int] = ..., steps_per_second: _Optional[float] = ..., uptime_seconds: _Optional[float] = ..., weight: _Optional[float] = ..., inbox_weight: _Optional[float] = ..., in_flight_weight: _Optional[float] = ..., in_flight_pushes: _Optional[int] = ..., weight_written_off: _Optional[float] = ..., founded_weight: _Optional[float] = ..., last_loss: _Optional[float] = ..., messages_sent: _Optional[int] = ..., messages_received: _Optional[int] = ..., messages_returned: _Optional[int] = ..., peers: _Optional[_Iterable[_Union[PeerStatus, _Mapping]]] = ...) -> None: ...
