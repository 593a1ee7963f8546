// posgate's reference web POS: the cashier types an amount, the page creates the payment intent
// through posgate, shows the QR code, waits for the signed confirmation, verifies it here, shows
// PAID / UNDERPAID / EXPIRED / …, and acks it. A reload (or a crashed tab) picks up the sale where
// it was: the sale lives in localStorage, written before every step that the gateway could see
// twice (the create's request_id before the request, the shown seq before the ack).
//
// Its settings come from ./config.json: {"gateway","terminal_id","http_token","gateway_jwk",
// "channels"?}, which `posgate-sim web-pos --bundle FILE` serves from the terminal's provisioning
// bundle (see README.md for why, and what that means for the token).

import qrcode from './node_modules/qrcode-generator/dist/qrcode.mjs';
import { ApiError, Gateway, listen } from './gateway.js';
import { importGatewayKey, verifyConfirmation } from './verify.js';

const $ = (id) => document.getElementById(id);

const OUTCOMES = {
  confirmed: ['paid', 'PAID', 'Paid in full. Hand over the goods.'],
  expired: ['expired', 'EXPIRED', 'Not paid in time. Start a new sale.'],
  cancelled: ['cancelled', 'CANCELLED', 'The payment was cancelled.'],
  underpaid: ['underpaid', 'UNDERPAID', 'Less than the amount due arrived. Do not hand over the goods; see a manager.'],
  overpaid: ['overpaid', 'OVERPAID', 'More than the amount due arrived; the goods are paid. See a manager about the difference.'],
  late: ['late', 'PAID LATE', 'Paid after the request expired. See a manager.'],
  multiple: ['multiple', 'PAID TWICE', 'The customer paid more than once. See a manager.'],
};

const CHANNEL_NAMES = { sse: 'SSE', ws: 'WebSocket', poll: 'polling' };

let config;
let gateway;
let key;
let storageKey;
// last_seq is a decimal string: seq is a u64 (verify.js reads it as a BigInt), which neither a
// Number nor JSON.stringify carries exactly.
let state = { last_seq: '0', sale: null };
let rejected = 0;
// Confirmations are handled one at a time, in arrival order (verification is asynchronous).
let queue = Promise.resolve();

function save() {
  localStorage.setItem(storageKey, JSON.stringify(state));
}

function load() {
  try {
    const stored = JSON.parse(localStorage.getItem(storageKey) ?? 'null');
    // (A number is what earlier versions of this page stored.)
    if (stored && /^[0-9]+$/.test(String(stored.last_seq))) {
      state = { ...stored, last_seq: String(stored.last_seq) };
    }
  } catch {
    // A damaged entry: start afresh (the gateway still holds every unacked confirmation).
  }
}

function problem(text) {
  $('problem').textContent = text;
  $('problem').hidden = !text;
}

function show(view, bodyState) {
  for (const id of ['sale', 'awaiting', 'result']) $(id).hidden = id !== view;
  document.body.dataset.state = bodyState;
}

function render() {
  const sale = state.sale;
  if (!sale) {
    show('sale', 'idle');
    $('charge').disabled = false;
    $('amount').focus();
  } else if (sale.outcome) {
    const { status, context } = sale.outcome;
    const [bodyState, text, detail] = OUTCOMES[status === 'unresolved' ? context : status] ?? [
      'unresolved',
      'SEE MANAGER',
      'The payment needs a look.',
    ];
    $('outcome').textContent = text;
    $('outcome-detail').textContent = `${detail} (${sale.amount} USDC, ${sale.intent?.intent_id ?? ''})`;
    show('result', bodyState);
  } else if (sale.intent) {
    $('due').textContent = sale.intent.amount;
    $('intent-id').textContent = sale.intent.intent_id;
    $('qr-payload').textContent = sale.intent.qr_payload;
    const qr = qrcode(0, 'M');
    qr.addData(sale.intent.qr_payload);
    qr.make();
    $('qr').innerHTML = qr.createSvgTag({ cellSize: 6, margin: 24, scalable: true }) // a quiet zone of 4 modules;
    $('cancel').disabled = false;
    tick();
    show('awaiting', 'awaiting');
  } else {
    show('sale', 'creating');
    $('charge').disabled = true;
  }
}

function tick() {
  const expiresAt = state.sale?.intent?.expires_at;
  if (!expiresAt || state.sale.outcome) return;
  const left = Math.round((Date.parse(expiresAt) - Date.now()) / 1000);
  $('expires').textContent =
    left > 0
      ? `Expires in ${Math.floor(left / 60)}:${String(left % 60).padStart(2, '0')}.`
      : 'Expired here; waiting for the gateway to say so.';
}

/** "4.4" → "4.40"; null when not an amount of whole cents from 0.01 to 10000. */
function parseAmount(text) {
  const m = /^\s*(\d{1,5})(?:[.,](\d{1,2}))?\s*$/.exec(text);
  if (!m) return null;
  const cents = Number(m[1]) * 100 + Number((m[2] ?? '').padEnd(2, '0'));
  if (cents < 1 || cents > 1_000_000) return null;
  return `${Math.floor(cents / 100)}.${String(cents % 100).padStart(2, '0')}`;
}

async function charge(event) {
  event.preventDefault();
  const amount = parseAmount($('amount').value);
  $('amount-error').hidden = amount !== null;
  if (amount === null) {
    $('amount-error').textContent = 'An amount from 0.01 to 10000.00, in dollars and cents.';
    return;
  }
  problem('');
  const now = new Date();
  // Saved before the request: a reload while it is in flight sends it again with the same
  // request_id, and the gateway answers with the same intent.
  state.sale = {
    request_id: crypto.randomUUID(),
    order_id: `web-${now.toISOString().replace(/\D/g, '').slice(0, 14)}-${Math.floor(Math.random() * 1e6)}`,
    amount,
    intent: null,
    outcome: null,
  };
  save();
  render();
  await create();
}

async function create() {
  const sale = state.sale;
  for (let attempt = 0; state.sale === sale; attempt++) {
    try {
      const intent = await gateway.createIntent(sale);
      if (state.sale !== sale) return;
      sale.intent = {
        intent_id: intent.intent_id,
        qr_payload: intent.qr_payload,
        amount: intent.amount,
        expires_at: intent.expires_at,
      };
      save();
      render();
      return;
    } catch (e) {
      // Worth another try with the same request_id: nothing was created twice, and the
      // gateway says so (busy, provider unreachable, network down).
      const again =
        !(e instanceof ApiError) || e.status === 429 || (e.status === 503 && attempt < 10);
      if (!again) {
        state.sale = null;
        save();
        render();
        problem(`The payment could not be started: ${e.message}`);
        return;
      }
      problem(`Starting the payment… (${e.message}; trying again)`);
      await new Promise((r) => setTimeout(r, (e.retryAfter ?? 1) * 1000));
    }
  }
}

/** After a reload: the stored sale, checked against the gateway. */
async function recover() {
  const sale = state.sale;
  if (!sale || sale.outcome) return;
  if (!sale.intent) {
    await create();
    return;
  }
  try {
    await gateway.getIntent(sale.intent.intent_id);
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) {
      state.sale = null;
      save();
      render();
      problem(`The gateway does not know payment ${sale.intent.intent_id}; start the sale again.`);
    }
    // Anything else: keep waiting; the confirmation comes whenever it comes.
  }
}

function refuse(error) {
  rejected += 1;
  document.body.dataset.rejected = String(rejected);
  $('rejected').hidden = false;
  $('rejected').textContent =
    `Refused ${rejected} message(s) that failed verification (last: ${error.reason ?? error.message}). ` +
    'Not shown, not acknowledged.';
  console.warn('posgate: refused a confirmation:', error);
}

async function onConfirmation(jws, ack) {
  let c;
  try {
    c = await verifyConfirmation(jws, key, config.terminal_id, 0);
  } catch (e) {
    refuse(e);
    return;
  }
  // Shown once: a seq at or below the last one shown is a repeat (the gateway resends until it
  // has the ack). Recorded before the ack, so a reload in between does not show it twice.
  if (c.seq > BigInt(state.last_seq)) {
    state.last_seq = String(c.seq);
    const sale = state.sale;
    if (sale?.intent?.intent_id === c.intent_id) {
      sale.outcome = { status: c.status, context: c.context ?? null, seq: String(c.seq) };
      $('outcome').dataset.shownAt = String(Date.now());
    } else {
      // An earlier sale, settled after the cashier moved on (a late payment, say): said, not
      // put over the current one.
      const [, text] = OUTCOMES[c.status === 'unresolved' ? c.context : c.status] ?? [, c.status];
      $('earlier').textContent = `Earlier sale ${c.intent_id} (${c.amount} USDC): ${text}.`;
      $('earlier').hidden = false;
    }
    save();
    render();
  }
  // Every confirmation that verifies is acked, repeats included, or the gateway's queue for
  // this terminal stalls.
  try {
    await ack(c.intent_id, c.seq);
  } catch (e) {
    console.warn('posgate: ack failed; the gateway will send it again', e);
  }
}

async function cancel() {
  const intentId = state.sale?.intent?.intent_id;
  if (!intentId) return;
  $('cancel').disabled = true;
  try {
    // The outcome comes as a signed confirmation (CANCELLED), like any other.
    await gateway.cancelIntent(intentId);
  } catch (e) {
    problem(`Cancel failed: ${e.message}`);
    $('cancel').disabled = false;
  }
}

function next() {
  state.sale = null;
  save();
  problem('');
  $('amount').value = '';
  render();
}

function channelStatus(channel, status, detail) {
  const el = $('channel');
  el.dataset.channel = channel;
  el.dataset.status = status;
  el.textContent = `${CHANNEL_NAMES[channel] ?? channel}: ${status}`;
  if (status === 'revoked') problem(`This terminal is refused by the gateway: ${detail}`);
}

async function main() {
  if (!window.isSecureContext || !crypto.subtle) {
    problem('Serve this page over https (or from localhost): signatures can only be checked in a secure context.');
    document.body.dataset.state = 'problem';
    return;
  }
  try {
    const response = await fetch('config.json', { cache: 'no-store' });
    if (!response.ok) throw new Error(`config.json: ${response.status}`);
    config = await response.json();
  } catch (e) {
    problem(`No configuration: ${e.message}`);
    document.body.dataset.state = 'problem';
    return;
  }
  try {
    key = await importGatewayKey(config.gateway_jwk);
  } catch (e) {
    problem(`This browser cannot check the gateway's Ed25519 signatures, so it cannot be a terminal: ${e.message}`);
    document.body.dataset.state = 'problem';
    return;
  }
  gateway = new Gateway(config.gateway, config.http_token);
  storageKey = `posgate-web-pos:${config.terminal_id}`;
  $('terminal').textContent = config.terminal_id;
  load();
  $('sale').addEventListener('submit', charge);
  $('cancel').addEventListener('click', cancel);
  $('next').addEventListener('click', next);
  setInterval(tick, 1000);
  render();
  listen(gateway, {
    channels: config.channels,
    currentIntent: () => (state.sale?.outcome ? null : state.sale?.intent?.intent_id),
    onStatus: channelStatus,
    onConfirmation: (jws, ack) => {
      queue = queue.then(() => onConfirmation(jws, ack));
      return queue;
    },
  });
  await recover();
}

main();
