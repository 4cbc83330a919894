"""docs/asyncapi.yaml: the AsyncAPI 3.0 document, generated from the code's own types and defaults.

    uv run python -m service.local.asyncapi > docs/asyncapi.yaml

A test fails when the committed file differs from what this prints, and
another validates it with the official AsyncAPI parser.
"""

from __future__ import annotations

from typing import Any, Final, get_args

import msgspec
from sign_in_tokens_client.contract.errors import BY_CODE
from sign_in_tokens_client.contract.messages import (
    JSON,
    MSGPACK,
    ActorTokenRequest,
    Reply,
    RevokeRequest,
    SignInTokenRequest,
)

from service import __version__
from service.amqp.publisher import DeadLetterReason
from service.config import Settings
from service.trust.audit import AuditEvent

ERROR_CODES: Final = tuple(BY_CODE)
DEAD_LETTER_REASONS: Final = get_args(DeadLetterReason)
_SCHEMAS: Final = "#/components/schemas/"

_TRACE_HEADERS: Final = {
    "traceparent": {"type": "string", "description": "W3C trace context: the worker continues the caller's trace."},
    "tracestate": {"type": "string", "description": "W3C trace state, carried with traceparent."},
}
_AMQP_PROPERTIES: Final = {
    "type": "object",
    "description": "AMQP basic properties the service reads (not headers).",
    "properties": {
        "reply_to": {"type": "string", "description": "Queue for the reply; absent: RESULTS_QUEUE."},
        "correlation_id": {"type": "string", "description": "Echoed on the reply; absent: the message_id is."},
        "message_id": {
            "type": "string",
            "description": "Idempotency key, scoped to the publisher: the same key gets the same final answer "
            "within IDEMPOTENCY_WINDOW_SECONDS.",
        },
        "user_id": {
            "type": "string",
            "description": "The caller, validated by RabbitMQ against the connection's user: what the policy and "
            "revocations know it by.",
        },
        "content_type": {"type": "string", "enum": [JSON, MSGPACK], "description": "Absent: JSON."},
    },
}


def _schemas() -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The payload schemas, as AsyncAPI schema objects, and the components they refer to."""
    refs, components = msgspec.json.schema_components(
        [SignInTokenRequest, ActorTokenRequest, RevokeRequest, Reply, AuditEvent], ref_template=_SCHEMAS + "{name}"
    )
    names = ("request", "impersonate", "revoke", "reply", "audit")
    payloads = dict(zip(names, refs, strict=True))
    # Either spelling of the required fields.
    components["SignInTokenRequest"]["oneOf"] = [{"required": ["user_id"]}, {"required": ["userId"]}]
    actor = components["ActorTokenRequest"]
    actor["required"] = ["actor"]
    actor["oneOf"] = [{"required": ["user_id"]}, {"required": ["userId"]}]
    actor["properties"]["actor"]["description"] = (
        "The impersonator: sub (its user id) required; another key only when the caller's actor_keys lists "
        "it; iss and sid never (Clerk sets them)."
    )
    actor["properties"]["actor"]["required"] = ["sub"]
    components["RevokeRequest"]["oneOf"] = [
        {"required": [name]} for name in ("sign_in_token_id", "signInTokenId", "actor_token_id", "actorTokenId")
    ]
    # Exactly one token in a created or revoked reply.
    for carries in ("Created", "Revoked"):
        components[carries]["oneOf"] = [{"required": ["sign_in_token"]}, {"required": ["actor_token"]}]
    components["ErrorDetail"]["properties"]["code"]["enum"] = list(ERROR_CODES)
    _discriminators_as_names(payloads)
    _discriminators_as_names(components)
    return payloads, components


def _discriminators_as_names(node: Any) -> None:  # noqa: ANN401 - any part of a schema
    """Msgspec writes OpenAPI's ``discriminator`` object; an AsyncAPI schema's is the property's name."""
    if isinstance(node, dict):
        found = node.get("discriminator")
        if isinstance(found, dict):
            node["discriminator"] = found["propertyName"]
        for value in node.values():
            _discriminators_as_names(value)
    elif isinstance(node, list):
        for value in node:
            _discriminators_as_names(value)


def _queue(address: str, description: str, messages: dict[str, str]) -> dict[str, Any]:
    return {
        "address": address,
        "description": description,
        "messages": {key: {"$ref": f"#/components/messages/{name}"} for key, name in messages.items()},
        "bindings": {"amqp": {"is": "queue", "queue": {"name": address, "durable": True}, "bindingVersion": "0.3.0"}},
    }


def _messages(payloads: dict[str, dict[str, Any]]) -> dict[str, Any]:
    request_headers = {
        "type": "object",
        "properties": {
            "x-deadline": {
                "type": "integer",
                "description": "Unix epoch milliseconds: after it no token is created (another type: invalid_request).",
            },
            "x-clerk-instance": {
                "type": "string",
                "description": "The Clerk instance the request is for; absent: the caller's default_instance "
                "(policy), else default. One the caller may not use is forbidden; one there is not, invalid_request.",
            },
            "x-reply-public-key": {
                "type": "string",
                "description": "Sealed replies: the caller's public key (base64) the reply is sealed to, one of its "
                "policy's reply_public_key (two while it rolls); absent: the first. Another is forbidden.",
            },
            **_TRACE_HEADERS,
        },
    }
    reply = {
        "summary": "The reply: created with Clerk's SignInToken (or ActorToken, for an impersonation), revoked, "
        "or failed with one of seven codes.",
        "headers": {
            "type": "object",
            "required": ["x-outcome", "x-caller"],
            "properties": {
                "x-outcome": {"type": "string", "enum": ["created", "revoked", "failed"]},
                "x-caller": {
                    "type": "string",
                    "description": "The requester's validated user_id (empty when it had none): a client drops a "
                    "reply for another caller.",
                },
                "x-sealed": {
                    "type": "string",
                    "enum": ["nacl-box"],
                    "description": "A sealed reply: the token object's sealed (a NaCl box from the service's key to "
                    "the caller's) holds token and url, bound to the reply's fields.",
                },
                "x-clerk-instance": {
                    "type": "string",
                    "description": "A sealed reply's Clerk instance, which its box is bound to.",
                },
                **_TRACE_HEADERS,
            },
        },
        "payload": payloads["reply"],
        "correlationId": {"location": "$message.header#/correlation_id"},
        "x-amqp-properties": {
            "correlation_id": "the request's correlation_id, or its message_id",
            "content_type": "the request's (JSON when it had none or another)",
            "delivery_mode": 2,
            "user_id": "the service's own broker user (RabbitMQ checks it): a client drops a reply without it",
        },
    }

    def request(summary: str, payload: dict[str, Any], content_type: str) -> dict[str, Any]:
        return {
            "summary": summary,
            "contentType": content_type,
            "headers": request_headers,
            "payload": payload,
            "correlationId": {"location": "$message.header#/correlation_id"},
            "x-amqp-properties": _AMQP_PROPERTIES,
        }

    create = "Ask for one sign-in token: user_id (or userId) required, expires_in_seconds and org_id optional."
    impersonate = (
        "Ask for one actor token (impersonation): user_id (or userId) and actor required, expires_in_seconds and "
        "session_max_duration_in_seconds optional (absent: the caller's maxima)."
    )
    revoke = "Revoke a token this caller was given: sign_in_token_id or actor_token_id (or their camelCase)."
    return {
        "CreateRequestJson": request(create, payloads["request"], JSON),
        "CreateRequestMsgpack": request(create, payloads["request"], MSGPACK),
        "ImpersonateRequestJson": request(impersonate, payloads["impersonate"], JSON),
        "ImpersonateRequestMsgpack": request(impersonate, payloads["impersonate"], MSGPACK),
        "RevokeRequestJson": request(revoke, payloads["revoke"], JSON),
        "RevokeRequestMsgpack": request(revoke, payloads["revoke"], MSGPACK),
        "ReplyJson": {**reply, "contentType": JSON},
        "ReplyMsgpack": {**reply, "contentType": MSGPACK},
        "DeadLetter": {
            "summary": "A request that could not be answered, as it was published, its user_id moved to a header.",
            "description": "Copied here by the worker (x-dead-letter-reason) or by RabbitMQ when a request "
            "reaches the lane's delivery limit (x-death, x-first-death-reason: delivery_limit).",
            "headers": {
                "type": "object",
                "properties": {
                    "x-dead-letter-reason": {"type": "string", "enum": list(DEAD_LETTER_REASONS)},
                    "x-original-routing-key": {"type": "string", "description": "The queue it came from."},
                    "x-original-user-id": {
                        "type": "string",
                        "description": "Its validated user_id property; empty when it had none.",
                    },
                    "x-original-expiration": {"type": "string", "description": "Its expiration property, if any."},
                    "x-first-death-reason": {"type": "string", "description": "Set by RabbitMQ: delivery_limit."},
                    "x-death": {"type": "array", "description": "Set by RabbitMQ when it dead-lettered it."},
                },
            },
            "payload": {"description": "The request's body, unchanged (it may not be decodable at all)."},
        },
        "AuditEvent": {
            "summary": "One outcome: created, refused, failed or revoked. Never the token or its URL.",
            "contentType": JSON,
            "headers": {"type": "object", "properties": _TRACE_HEADERS},
            "payload": payloads["audit"],
        },
    }


def document() -> dict[str, Any]:
    """The AsyncAPI 3.0 document as a mapping."""
    defaults = Settings()
    payloads, schemas = _schemas()
    requests = {"json": "CreateRequestJson", "msgpack": "CreateRequestMsgpack"}
    replies = {"json": "ReplyJson", "msgpack": "ReplyMsgpack"}
    channels: dict[str, Any] = {
        "interactive": _queue(defaults.request_queue, "The interactive lane (REQUEST_QUEUE).", requests),
        "bulk": _queue(defaults.bulk_queue, "The bulk lane (BULK_QUEUE), served after the interactive one.", requests),
        "impersonate": _queue(
            defaults.impersonation_queue,
            "Impersonations (IMPERSONATION_QUEUE): actor tokens, at the interactive lane's priority.",
            {"json": "ImpersonateRequestJson", "msgpack": "ImpersonateRequestMsgpack"},
        ),
        "revoke": _queue(
            defaults.revoke_queue,
            "Revocations (REVOKE_QUEUE), served only for the caller the token was given to.",
            {"json": "RevokeRequestJson", "msgpack": "RevokeRequestMsgpack"},
        ),
        "replies": {
            "address": "{replyTo}",
            "description": "The request's reply_to: a queue of the caller's, or amq.rabbitmq.reply-to "
            "(direct reply-to). Published to the default exchange, persistent; mandatory except for direct reply-to.",
            "parameters": {"replyTo": {"description": "The request's reply_to property."}},
            "messages": {key: {"$ref": f"#/components/messages/{name}"} for key, name in replies.items()},
        },
        "results": _queue(defaults.results_queue, "Replies of requests without reply_to (RESULTS_QUEUE).", replies),
        "deadLetters": _queue(
            defaults.dead_letter_queue,
            "Requests that cannot be answered at all (DEAD_LETTER_QUEUE).",
            {"copy": "DeadLetter"},
        ),
        "audit": {
            "address": defaults.audit_exchange,
            "description": "AUDIT_EXCHANGE: a durable topic exchange, routing key EVENT.LANE (created.bulk, "
            "refused.interactive, failed.bulk, revoked.interactive); each event confirmed before its request is acked.",
            "messages": {"event": {"$ref": "#/components/messages/AuditEvent"}},
            "bindings": {
                "amqp": {
                    "is": "routingKey",
                    "exchange": {"name": defaults.audit_exchange, "type": "topic", "durable": True},
                    "bindingVersion": "0.3.0",
                }
            },
        },
    }

    def operation(action: str, channel: str, summary: str, reply: bool = False) -> dict[str, Any]:  # noqa: FBT001, FBT002
        found: dict[str, Any] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{channel}"},
            "summary": summary,
            "messages": [{"$ref": f"#/channels/{channel}/messages/{key}"} for key in channels[channel]["messages"]],
        }
        if reply:
            found["reply"] = {
                "address": {"location": "$message.header#/reply_to"},
                "channel": {"$ref": "#/channels/replies"},
                "messages": [{"$ref": f"#/channels/replies/messages/{key}"} for key in replies],
            }
        return found

    operations = {
        "createToken": operation("send", "interactive", "Ask for a token; a person is waiting.", reply=True),
        "createTokenBulk": operation("send", "bulk", "Ask for a token from a batch job.", reply=True),
        "impersonate": operation(
            "send", "impersonate", "Ask for an actor token: log in as a user, the impersonator named.", reply=True
        ),
        "revokeToken": operation("send", "revoke", "Revoke a token this caller received.", reply=True),
        "receiveResults": operation("receive", "results", "Read replies of requests sent without reply_to."),
        "receiveDeadLetters": operation("receive", "deadLetters", "Inspect requests that could not be answered."),
        "receiveAuditEvents": operation("receive", "audit", "Bind a queue to the audit trail and read it."),
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "sign-in-token-service",
            "version": __version__,
            "description": "Clerk sign-in tokens behind RabbitMQ: publish a request to a lane's queue through the "
            "default exchange, get the token on your reply_to. Generated by `python -m service.local.asyncapi`.",
        },
        "defaultContentType": JSON,
        "servers": {
            "broker": {
                "host": "localhost:5672",
                "protocol": "amqp",
                "description": "AMQP_URL (amqps:// for TLS).",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": _messages(payloads), "schemas": schemas},
    }


def render() -> str:
    """The document as YAML, keys in the order they were built (PyYAML, a development dependency)."""
    import yaml  # noqa: PLC0415 - only the generator needs it, never the worker

    return str(yaml.safe_dump(document(), sort_keys=False, allow_unicode=True, width=100))


if __name__ == "__main__":
    print(render(), end="")  # noqa: T201 - the module's output
