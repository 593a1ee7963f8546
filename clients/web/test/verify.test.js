// The web POS's confirmation check (verify.js) on Node's WebCrypto: `npm test` in clients/web
// (node --test). One case per rule; the browser runs the same module.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { base64urlDecode, importGatewayKey, verifyConfirmation } from '../verify.js';

const enc = (bytes) => Buffer.from(bytes).toString('base64url');
const encJson = (value) => enc(new TextEncoder().encode(JSON.stringify(value)));

async function gatewayKey() {
  const pair = await crypto.subtle.generateKey({ name: 'Ed25519' }, true, ['sign', 'verify']);
  const x = enc(new Uint8Array(await crypto.subtle.exportKey('raw', pair.publicKey)));
  return { pair, jwk: { kty: 'OKP', crv: 'Ed25519', x, kid: 'kid-1' } };
}

const payload = (fields = {}) => ({
  v: 1,
  terminal_id: 'pos_01',
  intent_id: 'pi_1',
  seq: 7,
  status: 'confirmed',
  amount: '4.40',
  amount_micros: 4400000,
  currency: 'usd',
  issued_at: '2026-04-01T20:00:12Z',
  ...fields,
});

async function sign(privateKey, header, body) {
  const input = `${encJson(header)}.${encJson(body)}`;
  const sig = await crypto.subtle.sign({ name: 'Ed25519' }, privateKey, new TextEncoder().encode(input));
  return `${input}.${enc(new Uint8Array(sig))}`;
}

const HEADER = { alg: 'EdDSA', kid: 'kid-1', typ: 'JWT' };

// A payload written as text, for numbers JSON.stringify cannot write.
async function signText(privateKey, header, bodyText) {
  const input = `${encJson(header)}.${enc(new TextEncoder().encode(bodyText))}`;
  const sig = await crypto.subtle.sign({ name: 'Ed25519' }, privateKey, new TextEncoder().encode(input));
  return `${input}.${enc(new Uint8Array(sig))}`;
}

async function refused(promise, reason) {
  await assert.rejects(promise, (e) => {
    assert.equal(e.reason, reason, e.message);
    return true;
  });
}

test('a genuine confirmation verifies and returns its payload', async () => {
  const { pair, jwk } = await gatewayKey();
  const key = await importGatewayKey(jwk);
  const jws = await sign(pair.privateKey, HEADER, payload({ status: 'unresolved', context: 'underpaid' }));
  const c = await verifyConfirmation(jws, key, 'pos_01', 7);
  assert.equal(c.status, 'unresolved');
  assert.equal(c.context, 'underpaid');
  assert.equal(c.seq, 7n);
});

test('each rule refuses what breaks it', async () => {
  const { pair, jwk } = await gatewayKey();
  const key = await importGatewayKey(jwk);
  const good = await sign(pair.privateKey, HEADER, payload());
  const [h, p, s] = good.split('.');

  await refused(verifyConfirmation(`${h}.${p}`, key, 'pos_01'), 'malformed');
  await refused(verifyConfirmation(`${good}.x`, key, 'pos_01'), 'malformed');
  await refused(verifyConfirmation(`${h}=.${p}.${s}`, key, 'pos_01'), 'malformed');
  await refused(verifyConfirmation(`${h}.${p}.${s.slice(0, -1)}+`, key, 'pos_01'), 'malformed');
  await refused(verifyConfirmation(`${encJson([1])}.${p}.${s}`, key, 'pos_01'), 'malformed');

  for (const header of [
    { ...HEADER, alg: 'none' },
    { ...HEADER, alg: 'HS256' },
    { ...HEADER, alg: 'Ed25519' },
    { ...HEADER, crit: ['exp'] },
  ]) {
    await refused(verifyConfirmation(await sign(pair.privateKey, header, payload()), key, 'pos_01'), 'bad_alg');
  }
  // kid is a name, not key material: another kid with the right key verifies (as in proto).
  const otherKid = await sign(pair.privateKey, { ...HEADER, kid: 'other' }, payload());
  assert.equal((await verifyConfirmation(otherKid, key, 'pos_01')).seq, 7n);
  await refused(verifyConfirmation(await sign(pair.privateKey, { typ: 'JWT' }, payload()), key, 'pos_01'), 'malformed');
  await refused(verifyConfirmation(await sign(pair.privateKey, { alg: 1 }, payload()), key, 'pos_01'), 'malformed');

  // Signed by another key; a payload changed after signing; an empty signature.
  const other = await gatewayKey();
  await refused(verifyConfirmation(await sign(other.pair.privateKey, HEADER, payload()), key, 'pos_01'), 'bad_signature');
  await refused(verifyConfirmation(`${h}.${encJson(payload({ seq: 8 }))}.${s}`, key, 'pos_01'), 'bad_signature');
  await refused(verifyConfirmation(`${h}.${p}.`, key, 'pos_01'), 'bad_signature');

  // The same signature with S + L (the group order): the same point, a lenient verifier
  // accepts it; strict verification does not.
  const sig = base64urlDecode(s);
  const L = 2n ** 252n + 27742317777372353535851937790883648493n;
  let sPlusL = 0n;
  for (let i = 63; i >= 32; i--) sPlusL = (sPlusL << 8n) | BigInt(sig[i]);
  sPlusL += L;
  const malleable = sig.slice();
  for (let i = 32; i < 64; i++) {
    malleable[i] = Number(sPlusL & 0xffn);
    sPlusL >>= 8n;
  }
  await refused(verifyConfirmation(`${h}.${p}.${enc(malleable)}`, key, 'pos_01'), 'bad_signature');

  for (const bad of [{ v: 2 }, { seq: -1 }, { seq: 1.5 }, { status: 'paid' }, { context: 'tip' }, { amount: 4.4 }]) {
    await refused(verifyConfirmation(await sign(pair.privateKey, HEADER, payload(bad)), key, 'pos_01'), 'bad_payload');
  }
  await refused(verifyConfirmation(good, key, 'pos_02'), 'wrong_terminal');
  await refused(verifyConfirmation(good, key, 'pos_01', 8), 'old_seq');
});

test('integers are read exactly: seq past 2^53, u64 bounds, duplicate members', async () => {
  const { pair, jwk } = await gatewayKey();
  const key = await importGatewayKey(jwk);
  const withSeq = (seq) => JSON.stringify(payload()).replace('"seq":7', `"seq":${seq}`);
  const signed = (text) => signText(pair.privateKey, HEADER, text);

  // 2^53 + 1 is 2^53 as a double: the replay check would let it through as new.
  const big = await signed(withSeq('9007199254740993'));
  assert.equal((await verifyConfirmation(big, key, 'pos_01', 9007199254740993n)).seq, 9007199254740993n);
  await refused(verifyConfirmation(big, key, 'pos_01', 9007199254740994n), 'old_seq');
  const max = await signed(withSeq('18446744073709551615'));
  assert.equal((await verifyConfirmation(max, key, 'pos_01')).seq, 2n ** 64n - 1n);
  for (const seq of ['18446744073709551616', '7.0', '7e0', '-1', '"7"']) {
    await refused(verifyConfirmation(await signed(withSeq(seq)), key, 'pos_01'), 'bad_payload');
  }
  // A member twice: which one counts is parser-dependent, so neither does.
  await refused(verifyConfirmation(await signed(withSeq('7,"seq":8')), key, 'pos_01'), 'bad_payload');
});

test('strict base64url', () => {
  assert.deepEqual([...base64urlDecode('AQID')], [1, 2, 3]);
  assert.deepEqual([...base64urlDecode('_-8')], [255, 239]);
  assert.throws(() => base64urlDecode('AQID='));
  assert.throws(() => base64urlDecode('A'));
  assert.throws(() => base64urlDecode('_-9'), /stray bits/);
});

test('a key that is not an Ed25519 JWK is refused', async () => {
  await refused(importGatewayKey({ kty: 'EC', crv: 'P-256', x: 'AA', kid: 'k' }), 'bad_key');
  await refused(importGatewayKey({ kty: 'OKP', crv: 'Ed25519', x: 'AQID', kid: 'k' }), 'bad_key');
});
