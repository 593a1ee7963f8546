// Verifies posgate's signed confirmations in a browser (or Node 20+) with WebCrypto's Ed25519.
//
// A confirmation is a compact JWS: base64url(header) "." base64url(payload) "." base64url(signature),
// no padding, header {"alg":"EdDSA","kid":"…","typ":"JWT"}, signed with the gateway's Ed25519 key
// whose JWK (`gateway_jwk`) comes in the terminal's provisioning bundle. The checks, in this order
// (the same as posgate_proto::confirmation::verify, docs/interfaces.md "Confirmations (JWS)"):
//   1. three parts of strict base64url (no padding, no stray bits), a JSON object with a string
//      alg as header;
//   2. alg is exactly "EdDSA" and there is no "crit": anything else (none, HS256, …) is refused
//      before the key is used (kid is a name, not key material: not checked, as in proto);
//   3. the signature: 64 bytes, S below the group order (no malleable twin), then
//      crypto.subtle.verify over the first two parts exactly as received;
//   4. the payload is a version 1 confirmation with every field of the right type (its integers
//      read exactly, as BigInt: seq is a u64 and may pass 2^53, where a double loses it);
//   5. terminal_id is this terminal's;
//   6. seq is at least minSeq.
// Nothing of the payload is looked at before the signature checks out. Only a confirmation that
// passes is shown or acked.

// JSON.parse reads every number as a double; lossless-json's parser hands us each number's text.
import { parse as parseLossless } from './node_modules/lossless-json/lib/esm/parse.js';

/** Why a confirmation was refused; `reason` is a stable label. */
export class VerifyError extends Error {
  constructor(reason, message) {
    super(message);
    this.name = 'VerifyError';
    this.reason = reason;
  }
}

const B64URL = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_';
const B64URL_VALUE = new Map([...B64URL].map((c, i) => [c, i]));

/**
 * Strict base64url without padding, as posgate writes it: any other character, a length that
 * cannot be base64 or non-zero bits in the last character is an error (so one message has exactly
 * one encoding).
 */
export function base64urlDecode(text) {
  if (typeof text !== 'string' || text.length % 4 === 1) {
    throw new VerifyError('malformed', 'not base64url');
  }
  const out = new Uint8Array(Math.floor((text.length * 3) / 4));
  let bits = 0;
  let value = 0;
  let n = 0;
  for (const c of text) {
    const v = B64URL_VALUE.get(c);
    if (v === undefined) throw new VerifyError('malformed', 'not base64url');
    value = (value << 6) | v;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out[n++] = (value >> bits) & 0xff;
    }
  }
  if (bits > 0 && (value & ((1 << bits) - 1)) !== 0) {
    throw new VerifyError('malformed', 'base64url with stray bits');
  }
  return out;
}

// The order of the Ed25519 group, little-endian: a signature's S must be below it.
const L = [
  0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14,
  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];

function canonicalS(signature) {
  for (let i = 31; i >= 0; i--) {
    const s = signature[32 + i];
    if (s !== L[i]) return s < L[i];
  }
  return false; // S == L
}

/**
 * Imports the bundle's `gateway_jwk` ({"kty":"OKP","crv":"Ed25519","x","kid"}) for
 * verifyConfirmation. Throws a VerifyError with reason `bad_key` when it is not an Ed25519 JWK, and
 * the browser's own error when it has no Ed25519 (then it cannot be a posgate terminal).
 */
export async function importGatewayKey(jwk) {
  if (!jwk || jwk.kty !== 'OKP' || jwk.crv !== 'Ed25519' || typeof jwk.kid !== 'string') {
    throw new VerifyError('bad_key', 'gateway_jwk is not an OKP/Ed25519 JWK with a kid');
  }
  const x = base64urlDecode(jwk.x);
  if (x.length !== 32) throw new VerifyError('bad_key', 'gateway_jwk x is not 32 bytes');
  const key = await crypto.subtle.importKey('raw', x, { name: 'Ed25519' }, false, ['verify']);
  return { key, kid: jwk.kid };
}

const STATUSES = new Set(['confirmed', 'expired', 'cancelled', 'unresolved']);
const CONTEXTS = new Set(['late', 'underpaid', 'overpaid', 'multiple']);
const utf8 = new TextDecoder('utf-8', { fatal: true });

function text(bytes, reason) {
  try {
    return utf8.decode(bytes);
  } catch {
    throw new VerifyError(reason, `${reason === 'malformed' ? 'header' : 'payload'} is not UTF-8`);
  }
}

function header(bytes) {
  try {
    return JSON.parse(text(bytes, 'malformed'));
  } catch (e) {
    if (e instanceof VerifyError) throw e;
    throw new VerifyError('malformed', 'header is not JSON');
  }
}

/**
 * Parses JSON with every integer as a BigInt, exactly (`9007199254740993` stays itself), and any
 * other number as a double. A member given twice is an error, as posgate's own parser says.
 */
export function parseExact(json) {
  return parseLossless(json, null, (raw) => (/^-?[0-9]+$/.test(raw) ? BigInt(raw) : Number(raw)));
}

function payload(bytes) {
  try {
    return parseExact(text(bytes, 'bad_payload'));
  } catch (e) {
    if (e instanceof VerifyError) throw e;
    throw new VerifyError('bad_payload', `payload is not JSON: ${e.message}`);
  }
}

const isObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);
const isString = (v) => typeof v === 'string';
const U64_MAX = 2n ** 64n - 1n;
const isCount = (v) => typeof v === 'bigint' && v >= 0n && v <= U64_MAX;
const optional = (check) => (v) => v === undefined || check(v);

// The payload's fields and their types (docs/interfaces.md); others are ignored.
const FIELDS = {
  v: (v) => v === 1n,
  terminal_id: isString,
  intent_id: isString,
  seq: isCount,
  status: (v) => STATUSES.has(v),
  context: optional((v) => CONTEXTS.has(v)),
  amount: isString,
  amount_micros: isCount,
  currency: isString,
  order_id: optional(isString),
  tx_hash: optional(isString),
  issued_at: isString,
};

/** The payload members posgate defines, in the order of docs/interfaces.md. */
export const MEMBERS = Object.freeze(Object.keys(FIELDS));

/**
 * Verifies `jws` for terminal `terminalId` with the key from importGatewayKey and returns its
 * payload, whose integers (`v`, `seq`, `amount_micros`) are BigInts. `minSeq` (a BigInt, or a
 * safe integer Number) refuses replays below it (0: none); duplicates at or above it pass, and
 * the caller deduplicates on intent_id + seq.
 *
 * Throws a VerifyError whose `reason` is the first failed check: `malformed`, `bad_alg`,
 * `bad_signature`, `bad_payload`, `wrong_terminal`, `old_seq`.
 */
export async function verifyConfirmation(jws, gatewayKey, terminalId, minSeq = 0n) {
  const parts = typeof jws === 'string' ? jws.split('.') : [];
  if (parts.length !== 3) {
    throw new VerifyError('malformed', 'not a compact JWS (three parts)');
  }
  const [headerB64, payloadB64, signatureB64] = parts;
  const h = header(base64urlDecode(headerB64));
  if (!isObject(h) || typeof h.alg !== 'string') {
    throw new VerifyError('malformed', 'header is not a JSON object with a string alg');
  }
  if (h.alg !== 'EdDSA' || 'crit' in h) {
    throw new VerifyError('bad_alg', 'alg is not EdDSA, or crit is present');
  }
  const payloadBytes = base64urlDecode(payloadB64);
  const signature = base64urlDecode(signatureB64);
  if (signature.length !== 64 || !canonicalS(signature)) {
    throw new VerifyError('bad_signature', 'not a canonical Ed25519 signature');
  }
  const signingInput = new TextEncoder().encode(`${headerB64}.${payloadB64}`);
  const valid = await crypto.subtle.verify({ name: 'Ed25519' }, gatewayKey.key, signature, signingInput);
  if (!valid) throw new VerifyError('bad_signature', 'signature does not verify with the gateway key');
  const c = payload(payloadBytes);
  if (!isObject(c) || !Object.entries(FIELDS).every(([name, ok]) => ok(c[name]))) {
    throw new VerifyError('bad_payload', 'payload is not a version 1 confirmation');
  }
  if (c.terminal_id !== terminalId) {
    throw new VerifyError('wrong_terminal', `confirmation is for terminal ${c.terminal_id}`);
  }
  if (c.seq < BigInt(minSeq)) {
    throw new VerifyError('old_seq', `confirmation seq ${c.seq} is below ${minSeq}`);
  }
  return c;
}
