"""Message types and their codecs, declared once and reused on every message.

Requests arrive as JSON (``application/json`` or no content type) or
MessagePack (``application/msgpack``), in the Python SDK's spelling
(``user_id``) or the TypeScript SDK's (``userId``), one spelling a message.
Replies are a tagged union on ``outcome``; a ``created`` or ``revoked`` reply carries one token,
a sign-in token (``sign_in_token``) or an actor token (``actor_token``, impersonation). Clerk's
objects are decoded leniently (Clerk may add fields); our own inputs strictly.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Final, Literal, TypeAlias

import msgspec
from msgspec import UNSET, Meta, UnsetType

from sign_in_tokens_client.contract.errors import InvalidRequestError

JSON: Final = "application/json"
MSGPACK: Final = "application/msgpack"
_MSGPACK_ALIASES: Final = frozenset({MSGPACK, "application/x-msgpack", "application/vnd.msgpack"})

UserId = Annotated[str, Meta(min_length=1, max_length=256)]
OrgId = Annotated[str, Meta(min_length=1, max_length=256)]
ExpiresIn = Annotated[int, Meta(ge=1)]
# An actor object: ``sub`` and at most 15 more string keys, each value a string without control
# characters (the object is copied into the session's ``act`` claim and the audit trail).
ActorKey = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+(?![\s\S])")]
ActorValue = Annotated[str, Meta(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+(?![\s\S])")]
Actor = Annotated[dict[ActorKey, ActorValue], Meta(min_length=1, max_length=16)]
# The actor keys Clerk sets itself in the session's ``act`` claim: a caller never does.
CLERK_ACTOR_KEYS: Final = ("iss", "sid")

# The two kinds of token: a sign-in token opens an ordinary session, an actor token an impersonated one.
Kind: TypeAlias = Literal["sign_in_token", "actor_token"]


class Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base of the structs we accept from callers.

    ``forbid_unknown_fields`` so a typo (``expires_in_second``) is an error,
    not a silent 30-day token; ``frozen`` because a decoded request is a fact;
    ``kw_only`` so construction always names its fields.
    """


class SignInTokenRequest(Strict, frozen=True):
    """A request as it travels, in either spelling; ``decode_request`` checks one is used."""

    user_id: UserId | UnsetType = UNSET
    expires_in_seconds: ExpiresIn | UnsetType | None = UNSET
    org_id: OrgId | UnsetType | None = UNSET
    user_id_camel: UserId | UnsetType = msgspec.field(default=UNSET, name="userId")
    expires_in_seconds_camel: ExpiresIn | UnsetType | None = msgspec.field(
        default=UNSET,
        name="expiresInSeconds",
    )
    org_id_camel: OrgId | UnsetType | None = msgspec.field(default=UNSET, name="orgId")


class CreateSignInTokenRequestBody(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The body of Clerk's ``POST /sign_in_tokens``, as the SDKs define it.

    ``omit_defaults`` so an absent ``expires_in_seconds`` is not sent and
    Clerk applies its own default.
    """

    user_id: str
    expires_in_seconds: int | None = None
    org_id: str | None = None


class ActorTokenRequest(Strict, frozen=True):
    """An impersonation request (IMPERSONATION_QUEUE) as it travels, in either spelling."""

    user_id: UserId | UnsetType = UNSET
    actor: Actor | UnsetType = UNSET
    expires_in_seconds: ExpiresIn | UnsetType | None = UNSET
    session_max_duration_in_seconds: ExpiresIn | UnsetType | None = UNSET
    user_id_camel: UserId | UnsetType = msgspec.field(default=UNSET, name="userId")
    expires_in_seconds_camel: ExpiresIn | UnsetType | None = msgspec.field(default=UNSET, name="expiresInSeconds")
    session_max_duration_in_seconds_camel: ExpiresIn | UnsetType | None = msgspec.field(
        default=UNSET, name="sessionMaxDurationInSeconds"
    )


class CreateActorTokenRequestBody(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The body of Clerk's ``POST /actor_tokens`` (the policy fills in both lifetimes before it is sent)."""

    user_id: str
    actor: dict[str, str]
    expires_in_seconds: int | None = None
    session_max_duration_in_seconds: int | None = None

    @property
    def actor_sub(self) -> str:
        """The impersonator: the actor's ``sub``."""
        return self.actor["sub"]


class SignInToken(msgspec.Struct, kw_only=True):
    """Clerk's SignInToken object; lenient, since Clerk may add fields."""

    object: str
    id: str
    status: str
    user_id: str
    created_at: int
    updated_at: int
    # Optional in Clerk's spec: a revocation's answer may leave it out ("" then); a create's never does.
    token: str = ""
    url: str | None = None
    # A sealed reply's box (contract v3) in place of ``token`` and ``url``; never Clerk's, never sent unset.
    sealed: str | UnsetType = UNSET


class ActorToken(msgspec.Struct, kw_only=True):
    """Clerk's ActorToken object (impersonation): a SignInToken's fields and the ``actor``; lenient."""

    object: str
    id: str
    status: str
    user_id: str
    actor: dict[str, Any]
    created_at: int
    updated_at: int
    token: str = ""
    url: str | None = None
    sealed: str | UnsetType = UNSET


Token: TypeAlias = SignInToken | ActorToken


class ClerkError(msgspec.Struct, kw_only=True):
    """One entry of Clerk's ``errors`` list."""

    message: str = ""
    long_message: str = ""
    code: str = ""
    meta: dict[str, Any] | None = None


class ClerkErrors(msgspec.Struct, kw_only=True):
    """Clerk's error body."""

    errors: list[ClerkError] = msgspec.field(default_factory=list)
    meta: dict[str, Any] | None = None
    clerk_trace_id: str | None = None


class ErrorDetail(msgspec.Struct, frozen=True, kw_only=True):
    """The ``error`` of a failed reply; Clerk's fields are null when it was not called."""

    code: str
    message: str
    retryable: bool
    upstream_status: int | None
    upstream_code: str | None
    clerk_trace_id: str | None
    attempts: int


class _Carries(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A reply that carries one token, of either kind: exactly one of the two fields is set."""

    sign_in_token: SignInToken | None = None
    actor_token: ActorToken | None = None

    def __post_init__(self) -> None:
        """Refuse a reply with neither token, or both (a decode error for a reply read off the wire)."""
        if (self.sign_in_token is None) == (self.actor_token is None):
            msg = "a reply carries exactly one of `sign_in_token` and `actor_token`"
            raise ValueError(msg)

    @property
    def token_object(self) -> Token:
        """The token it carries, of either kind."""
        if self.actor_token is not None:
            return self.actor_token
        if self.sign_in_token is not None:
            return self.sign_in_token
        raise AssertionError  # __post_init__ made sure one is set

    @property
    def kind(self) -> Kind:
        """The kind of token it carries."""
        return "sign_in_token" if self.actor_token is None else "actor_token"


class Created(_Carries, frozen=True, kw_only=True, tag_field="outcome", tag="created"):
    """A token was created: ``sign_in_token``, or ``actor_token`` for an impersonation."""


class Revoked(_Carries, frozen=True, kw_only=True, tag_field="outcome", tag="revoked"):
    """A revocation request was served: the token as Clerk returned it, its status ``revoked``."""


def created(token: Token) -> Created:
    """The ``created`` reply carrying ``token``."""
    return Created(actor_token=token) if isinstance(token, ActorToken) else Created(sign_in_token=token)


def revoked(token: Token) -> Revoked:
    """The ``revoked`` reply carrying ``token``."""
    return Revoked(actor_token=token) if isinstance(token, ActorToken) else Revoked(sign_in_token=token)


class Failed(msgspec.Struct, frozen=True, kw_only=True, tag_field="outcome", tag="failed"):
    """No token (or no revocation): the error says why."""

    error: ErrorDetail


Reply = Created | Revoked | Failed
Outcome = Literal["created", "revoked", "failed"]


def outcome(reply: Reply) -> Outcome:
    """The reply's ``outcome`` tag (also its ``x-outcome`` header)."""
    if isinstance(reply, Created):
        return "created"
    return "revoked" if isinstance(reply, Revoked) else "failed"


# A Clerk object id (``sit_...``, ``act_...``): letters, digits, ``_`` and ``-``.
TokenId = Annotated[str, Meta(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_-]+(?![\s\S])")]


class RevokeRequest(Strict, frozen=True):
    """A revocation request (``REVOKE_QUEUE``), in either spelling: one token of either kind."""

    sign_in_token_id: TokenId | UnsetType = UNSET
    actor_token_id: TokenId | UnsetType = UNSET
    sign_in_token_id_camel: TokenId | UnsetType = msgspec.field(default=UNSET, name="signInTokenId")
    actor_token_id_camel: TokenId | UnsetType = msgspec.field(default=UNSET, name="actorTokenId")


class UndecodableError(Exception):
    """The body is not a JSON or MessagePack object at all."""


_json_request = msgspec.json.Decoder(SignInTokenRequest)
_msgpack_request = msgspec.msgpack.Decoder(SignInTokenRequest)
_json_actor_request = msgspec.json.Decoder(ActorTokenRequest)
_msgpack_actor_request = msgspec.msgpack.Decoder(ActorTokenRequest)
_json_revoke = msgspec.json.Decoder(RevokeRequest)
_msgpack_revoke = msgspec.msgpack.Decoder(RevokeRequest)
_json_any = msgspec.json.Decoder()
_msgpack_any = msgspec.msgpack.Decoder()
_json_reply_encoder = msgspec.json.Encoder()
_msgpack_reply_encoder = msgspec.msgpack.Encoder()
_json_reply_decoder: msgspec.json.Decoder[Reply] = msgspec.json.Decoder(Reply)
_msgpack_reply_decoder: msgspec.msgpack.Decoder[Reply] = msgspec.msgpack.Decoder(Reply)
clerk_token_decoder = msgspec.json.Decoder(SignInToken)
clerk_actor_token_decoder = msgspec.json.Decoder(ActorToken)
clerk_errors_decoder = msgspec.json.Decoder(ClerkErrors)
clerk_body_encoder = msgspec.json.Encoder()


@functools.lru_cache(maxsize=256)
def _media_type(content_type: str) -> tuple[str | None, str | None]:
    """``(JSON or MSGPACK or None for another type, the charset parameter lowercased or None)``.

    Type and subtype are case-insensitive and may carry parameters (RFC 9110, 8.3.1):
    ``Application/JSON; charset="UTF-8"`` is JSON. Cached: callers send a handful of spellings.
    """
    kind, _, parameters = content_type.partition(";")
    kind = kind.strip().lower()
    charset = None
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
    if kind == JSON:
        return JSON, charset
    return (MSGPACK if kind in _MSGPACK_ALIASES else None), charset


def media_type(content_type: str | None) -> str | None:
    """The canonical type of a request's ``content_type``: JSON (also when absent), MSGPACK, or None (unsupported)."""
    if not content_type or content_type == JSON:
        return JSON
    return _media_type(content_type)[0]


def is_msgpack(content_type: str | None) -> bool:
    """Whether ``content_type`` names MessagePack (with parameters or not, in any case)."""
    return media_type(content_type) == MSGPACK


def reply_content_type(request_content_type: str | None) -> str:
    """The reply's content type: MessagePack for a MessagePack request, else JSON (none or an unknown one too)."""
    return MSGPACK if is_msgpack(request_content_type) else JSON


def _check_charset(content_type: str | None) -> None:
    """InvalidRequestError for a charset parameter other than UTF-8 (both encodings are UTF-8 text inside)."""
    if not content_type or content_type == JSON:
        return
    charset = _media_type(content_type)[1]
    if charset is not None and charset != "utf-8":
        msg = f"content_type charset {charset!r} is not supported; send UTF-8 (charset=utf-8) or no charset"
        raise InvalidRequestError(msg)


def _is_object(body: bytes, content_type: str | None) -> bool:
    decoder = _msgpack_any if is_msgpack(content_type) else _json_any
    try:
        return isinstance(decoder.decode(body), dict)
    except (msgspec.DecodeError, RecursionError, ValueError):
        return False


def is_decodable(body: bytes, content_type: str | None, max_body_bytes: int) -> bool:
    """Whether ``body`` is an object in a supported encoding, within the size limit (else it is undecodable)."""
    return media_type(content_type) is not None and len(body) <= max_body_bytes and _is_object(body, content_type)


def _pick(snake: Any, camel: Any) -> Any:  # noqa: ANN401 - either spelling's value
    return camel if snake is UNSET else snake


def _check_one_spelling(snake: tuple[Any, ...], camel: tuple[Any, ...]) -> None:
    if any(v is not UNSET for v in snake) and any(v is not UNSET for v in camel):
        msg = "mixes snake_case and camelCase field names; use one spelling"
        raise InvalidRequestError(msg)


def _required(value: Any, name: str) -> Any:  # noqa: ANN401 - the field's value
    if value is UNSET:
        msg = f"Object missing required field `{name}`"
        raise InvalidRequestError(msg)
    return value


def _one_spelling(wire: SignInTokenRequest) -> CreateSignInTokenRequestBody:
    _check_one_spelling(
        (wire.user_id, wire.expires_in_seconds, wire.org_id),
        (wire.user_id_camel, wire.expires_in_seconds_camel, wire.org_id_camel),
    )
    user_id = _required(_pick(wire.user_id, wire.user_id_camel), "user_id")
    expires = _pick(wire.expires_in_seconds, wire.expires_in_seconds_camel)
    org_id = _pick(wire.org_id, wire.org_id_camel)
    return CreateSignInTokenRequestBody(
        user_id=user_id,
        expires_in_seconds=None if expires is UNSET else expires,
        org_id=None if org_id is UNSET else org_id,
    )


def _decode_object(
    body: bytes,
    content_type: str | None,
    decoders: tuple[msgspec.json.Decoder[Any], msgspec.msgpack.Decoder[Any]],
    max_body_bytes: int,
) -> Any:  # noqa: ANN401 - the decoders' struct
    """Decode a body with the decoder of its content type.

    Raises UndecodableError when the body is not an object in a supported
    encoding, InvalidRequestError (naming the field) when it is an object
    that breaks the contract.
    """
    kind = media_type(content_type)
    if kind is None:
        msg = f"unsupported content_type {content_type!r}; use {JSON} or {MSGPACK}"
        raise UndecodableError(msg)
    _check_charset(content_type)
    if len(body) > max_body_bytes:
        msg = f"body of {len(body)} bytes exceeds the limit of {max_body_bytes}"
        raise UndecodableError(msg)
    decoder = decoders[1] if kind == MSGPACK else decoders[0]
    try:
        return decoder.decode(body)
    except (msgspec.DecodeError, RecursionError, ValueError) as exc:
        if not _is_object(body, content_type):
            msg = "body is not a JSON or MessagePack object"
            raise UndecodableError(msg) from None
        raise InvalidRequestError(str(exc)) from None


def decode_request(
    body: bytes,
    content_type: str | None,
    *,
    max_expires_in_seconds: int,
    max_body_bytes: int,
) -> CreateSignInTokenRequestBody:
    """Decode and validate one request body (UndecodableError, InvalidRequestError: see ``_decode_object``)."""
    wire: SignInTokenRequest = _decode_object(body, content_type, (_json_request, _msgpack_request), max_body_bytes)
    request = _one_spelling(wire)
    expires = request.expires_in_seconds
    if expires is not None and expires > max_expires_in_seconds:
        msg = f"Expected `int` <= {max_expires_in_seconds} - at `$.expires_in_seconds`"
        raise InvalidRequestError(msg)
    return request


def decode_actor_request(body: bytes, content_type: str | None, *, max_body_bytes: int) -> CreateActorTokenRequestBody:
    """Decode and check an impersonation request (UndecodableError, InvalidRequestError as for a create)."""
    wire: ActorTokenRequest = _decode_object(
        body, content_type, (_json_actor_request, _msgpack_actor_request), max_body_bytes
    )
    _check_one_spelling(
        (wire.user_id, wire.expires_in_seconds, wire.session_max_duration_in_seconds),
        (wire.user_id_camel, wire.expires_in_seconds_camel, wire.session_max_duration_in_seconds_camel),
    )
    user_id = _required(_pick(wire.user_id, wire.user_id_camel), "user_id")
    actor: dict[str, str] = _required(wire.actor, "actor")
    if "sub" not in actor:
        msg = "Object missing required field `sub` - at `$.actor`"
        raise InvalidRequestError(msg)
    if any(c.isspace() for c in actor["sub"]):
        msg = "`sub` is the impersonator's user id: no spaces - at `$.actor.sub`"
        raise InvalidRequestError(msg)
    for key in CLERK_ACTOR_KEYS:
        if key in actor:
            msg = f"`{key}` is set by Clerk in the session's act claim, never by a caller - at `$.actor.{key}`"
            raise InvalidRequestError(msg)
    expires = _pick(wire.expires_in_seconds, wire.expires_in_seconds_camel)
    session = _pick(wire.session_max_duration_in_seconds, wire.session_max_duration_in_seconds_camel)
    return CreateActorTokenRequestBody(
        user_id=user_id,
        actor=actor,
        expires_in_seconds=None if expires is UNSET else expires,
        session_max_duration_in_seconds=None if session is UNSET else session,
    )


def decode_revoke(body: bytes, content_type: str | None, *, max_body_bytes: int) -> tuple[Kind, str]:
    """The token a revocation request names: its kind and id (UndecodableError, InvalidRequestError as for a create)."""
    wire: RevokeRequest = _decode_object(body, content_type, (_json_revoke, _msgpack_revoke), max_body_bytes)
    _check_one_spelling(
        (wire.sign_in_token_id, wire.actor_token_id), (wire.sign_in_token_id_camel, wire.actor_token_id_camel)
    )
    sign_in = _pick(wire.sign_in_token_id, wire.sign_in_token_id_camel)
    actor = _pick(wire.actor_token_id, wire.actor_token_id_camel)
    if sign_in is not UNSET and actor is not UNSET:
        msg = "names two tokens; send `sign_in_token_id` or `actor_token_id`, not both"
        raise InvalidRequestError(msg)
    if actor is not UNSET:
        return "actor_token", actor
    return "sign_in_token", _required(sign_in, "sign_in_token_id")


def encode_reply(reply: Reply, content_type: str, sealed: str | None = None) -> bytes:
    """Encode a reply in the given content type; ``sealed``: its token's box, in place of ``token`` and ``url``."""
    body: Reply | dict[str, Any] = reply
    if sealed is not None and not isinstance(reply, Failed):
        builtins: dict[str, Any] = msgspec.to_builtins(reply)
        token = builtins[reply.kind]
        del token["token"], token["url"]
        token["sealed"] = sealed
        body = builtins
    if content_type == MSGPACK:
        return _msgpack_reply_encoder.encode(body)
    return _json_reply_encoder.encode(body)


def decode_reply(body: bytes, content_type: str | None) -> Reply:
    """Decode a reply (clients and tests)."""
    if is_msgpack(content_type):
        return _msgpack_reply_decoder.decode(body)
    return _json_reply_decoder.decode(body)


def encode_clerk_body(request: CreateSignInTokenRequestBody | CreateActorTokenRequestBody) -> bytes:
    """The JSON body sent to Clerk."""
    return clerk_body_encoder.encode(request)
