// A caller from the TypeScript world, as a new user would write one: amqplib, direct reply-to,
// camelCase bodies, an x-deadline from Date.now(), JSON with a charset and MessagePack, and an
// impersonation (an actor token) in camelCase on IMPERSONATION_QUEUE.
// A reply is taken only when the service's broker user published it (userId, which RabbitMQ
// checks) for this caller (header x-caller): anything else is dropped as forged.
// Sealed replies (contract v3), with REPLY_PRIVATE_KEY and SERVICE_PUBLIC_KEY (base64; two,
// comma-separated, while the service's key rolls) set: each
// request names this caller's public key (x-reply-public-key), and each token's box is opened with
// tweetnacl, its bound fields checked against the reply; a box that does not open, or a token in
// clear, is dropped as forged.
// Prints one JSON line a reply: {"correlationId", "contentType", "outcome", "sealed", "body"}.
import amqp from "amqplib";
import { decode, encode } from "@msgpack/msgpack";
import nacl from "tweetnacl";

const url = process.env.AMQP_URL;
const queue = process.env.REQUEST_QUEUE ?? "sign_in_tokens.create";
const impersonationQueue = process.env.IMPERSONATION_QUEUE ?? "sign_in_tokens.impersonate";
const REPLY_TO = "amq.rabbitmq.reply-to";
const SERVICE_USER = process.env.SERVICE_USER ?? "sign-in-tokens";
const ME = decodeURIComponent(new URL(url).username || "guest");
const keyPair = process.env.REPLY_PRIVATE_KEY
  ? nacl.box.keyPair.fromSecretKey(new Uint8Array(Buffer.from(process.env.REPLY_PRIVATE_KEY, "base64")))
  : null;
// The service's public keys: two, comma-separated, while its key rolls. Each must be 32 bytes and
// give a shared key (tweetnacl does not refuse a low-order point such as all zeros: a forger could
// seal with the all-zero shared key): anything else is a configuration error, said at once.
const servicePublicKeys = keyPair
  ? (process.env.SERVICE_PUBLIC_KEY ?? "")
      .split(",")
      .map((key) => key.trim())
      .filter((key) => key)
      .map((key) => new Uint8Array(Buffer.from(key, "base64")))
  : [];
if (
  keyPair &&
  (servicePublicKeys.length === 0 ||
    servicePublicKeys.some(
      (key) => key.length !== nacl.box.publicKeyLength || nacl.scalarMult(keyPair.secretKey, key).every((b) => b === 0),
    ))
) {
  console.error("SERVICE_PUBLIC_KEY: each key must be the service's public key, 32 bytes in base64");
  process.exit(2);
}
const sealedHeaders = keyPair ? { "x-reply-public-key": Buffer.from(keyPair.publicKey).toString("base64") } : {};

// The reply's body with its token opened; null when it is forged: a box that does not open or is
// bound to another reply, a token in clear, or a token-carrying outcome without a token this caller knows.
function opened(message, body, request) {
  if (!keyPair) return body;
  const kind = ["sign_in_token", "actor_token"].find((name) => body[name]);
  if (!kind) return body.outcome === "failed" ? body : null;
  const token = body[kind];
  if (typeof token.sealed !== "string") return null;
  let secret;
  try {
    const box = Buffer.from(token.sealed, "base64");
    if (box.length < nacl.box.nonceLength + nacl.box.overheadLength) return null;
    const [nonce, ciphertext] = [box.subarray(0, nacl.box.nonceLength), box.subarray(nacl.box.nonceLength)];
    const inside = servicePublicKeys
      .map((key) => nacl.box.open(ciphertext, nonce, key, keyPair.secretKey))
      .find((opened) => opened);
    if (!inside) return null;
    secret = JSON.parse(Buffer.from(inside).toString("utf8"));
  } catch {
    return null;
  }
  const headers = message.properties.headers;
  const bound = {
    id: token.id,
    user_id: token.user_id,
    caller: headers["x-caller"],
    correlation_id: message.properties.correlationId,
    message_id: request.correlationId,
    instance: headers["x-clerk-instance"],
  };
  if (typeof secret?.token !== "string") return null;
  if (Object.entries(bound).some(([name, value]) => secret[name] !== value)) return null;
  const { sealed, ...rest } = token;
  return { ...body, [kind]: { ...rest, token: secret.token, url: secret.url } };
}

const requests = [
  {
    correlationId: "ts-json",
    contentType: "application/json; charset=utf-8",
    body: Buffer.from(JSON.stringify({ userId: "user_ts_json", expiresInSeconds: 300 })),
  },
  {
    correlationId: "ts-json-caps",
    contentType: "Application/JSON",
    body: Buffer.from(JSON.stringify({ userId: "user_ts_caps" })),
  },
  {
    correlationId: "ts-msgpack",
    contentType: "application/msgpack",
    body: Buffer.from(encode({ userId: "user_ts_msgpack", expiresInSeconds: 60 })),
  },
  {
    correlationId: "ts-latin1",
    contentType: "application/json; charset=iso-8859-1",
    body: Buffer.from(JSON.stringify({ userId: "user_ts_latin1" })),
  },
  {
    correlationId: "ts-impersonate",
    queue: impersonationQueue,
    contentType: "application/json",
    body: Buffer.from(
      JSON.stringify({
        userId: "user_ts_customer",
        actor: { sub: "user_ts_agent" },
        expiresInSeconds: 60,
        sessionMaxDurationInSeconds: 600,
      }),
    ),
  },
];

const connection = await amqp.connect(url);
const channel = await connection.createChannel();
const pending = new Map();
let allAnswered;
const done = new Promise((resolve) => {
  allAnswered = resolve;
});
// Direct reply-to: consume first, then publish on the same channel.
await channel.consume(
  REPLY_TO,
  (message) => {
    if (message.properties.userId !== SERVICE_USER || message.properties.headers["x-caller"] !== ME) {
      console.error(`forged reply dropped (${message.properties.correlationId})`);
      return;
    }
    const contentType = message.properties.contentType;
    const correlationId = message.properties.correlationId;
    const request = pending.get(correlationId);
    if (!request) return;
    const body = opened(
      message,
      contentType === "application/msgpack" ? decode(message.content) : JSON.parse(message.content.toString("utf8")),
      request,
    );
    if (body === null) {
      console.error(`forged reply dropped (${correlationId}): its box does not open`);
      return;
    }
    const outcome = message.properties.headers["x-outcome"];
    const sealed = message.properties.headers["x-sealed"] ?? null;
    console.log(JSON.stringify({ correlationId, contentType, outcome, sealed, body }));
    pending.delete(correlationId);
    if (pending.size === 0) allAnswered();
  },
  { noAck: true },
);
for (const request of requests) {
  pending.set(request.correlationId, request);
  channel.sendToQueue(request.queue ?? queue, request.body, {
    contentType: request.contentType,
    correlationId: request.correlationId,
    messageId: request.correlationId,
    replyTo: REPLY_TO,
    userId: ME,
    persistent: true,
    headers: { "x-deadline": Date.now() + 10_000, ...sealedHeaders },
  });
}
const waitMs = Number(process.env.TIMEOUT_MS ?? 20_000);
const timeout = setTimeout(() => {
  console.error(`no reply for ${[...pending.keys()].join(", ")} within ${waitMs / 1000} s`);
  process.exit(1);
}, waitMs);
await done;
clearTimeout(timeout);
await channel.close();
await connection.close();
