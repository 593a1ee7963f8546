// Every case of posgate's confirmation test vectors (proto/testdata/confirmation-vectors.json)
// through verify.js on Node's WebCrypto: `npm test` in clients/web. tests/it/web_pos.rs runs the
// same cases through the page's verify.js in headless Chromium.

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';

import { parse, parseNumberAndBigInt } from 'lossless-json';

import { MEMBERS, importGatewayKey, verifyConfirmation } from '../verify.js';

// Read exactly (integers as BigInt), and not with verify.js's own parser: a case's min_seq and
// payload seq may pass 2^53.
const vectors = parse(
  readFileSync(new URL('../../../proto/testdata/confirmation-vectors.json', import.meta.url), 'utf8'),
  null,
  parseNumberAndBigInt,
);

// verify.js's reasons by the names the vectors use (posgate's VerifyError variants).
const REASONS = {
  malformed: 'Malformed',
  bad_alg: 'BadAlg',
  bad_signature: 'BadSignature',
  bad_payload: 'BadPayload',
  wrong_terminal: 'WrongTerminal',
  old_seq: 'OldSeq',
};

test('the vectors file has the cases this test expects', () => {
  assert.ok(vectors.cases.length >= 40, `${vectors.cases.length} cases`);
  const big = vectors.cases.find((c) => c.name === 'ok_seq_above_2_53');
  assert.equal(big.payload.seq, 9007199254740993n, 'the file itself is read exactly');
});

for (const c of vectors.cases) {
  test(`${c.name} (${c.expect})`, async () => {
    const key = await importGatewayKey(vectors.key.jwk);
    let outcome;
    let payload;
    try {
      payload = await verifyConfirmation(c.jws, key, c.terminal_id, c.min_seq);
      outcome = 'ok';
    } catch (e) {
      assert.ok(e.reason in REASONS, `not a VerifyError: ${e.stack}`);
      outcome = REASONS[e.reason];
    }
    assert.equal(outcome, c.expect, c.reason);
    if (outcome === 'ok') {
      // The members posgate defines, exactly (integers as BigInt); unknown ones are not shown.
      const known = Object.fromEntries(MEMBERS.filter((m) => m in payload).map((m) => [m, payload[m]]));
      assert.deepEqual(known, c.payload);
    }
  });
}
