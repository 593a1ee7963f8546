// posgate's HTTP terminal API from a browser: requests with the terminal's bearer token, and the
// confirmation stream, on Server-Sent Events, else a WebSocket, else long polling.
//
// fetch() can send `Authorization: Bearer …`; EventSource and WebSocket cannot, so every stream
// is opened with a single-use ticket (POST /v1/terminal/tickets, good for one stream within
// 30 s): the long-lived token never goes into a URL. The page's origin must be listed in the
// gateway's `ingress.cors_allowed_origins`.

/** An error answer of the gateway: `status`, the house body's `code`, and `retryAfter` (s). */
export class ApiError extends Error {
  constructor(status, code, message, retryAfter) {
    super(`${status} ${code}: ${message}`);
    this.name = 'ApiError';
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

/**
 * An ack's JSON text, `{"intent_id","seq"}`, with seq written exactly: it is a u64 (a BigInt from
 * verify.js), which JSON.stringify cannot write and a Number may round.
 */
export function ackJson(intentId, seq) {
  return `{"intent_id":${JSON.stringify(intentId)},"seq":${BigInt(seq)}}`;
}

export class Gateway {
  /** `url`: the gateway's ingress as the browser reaches it (http(s)://host:port). */
  constructor(url, token) {
    this.url = url.replace(/\/+$/, '');
    this.token = token;
  }

  /** `body`: an object, sent as JSON, or JSON text as it is. */
  async request(method, path, body, { signal } = {}) {
    const response = await fetch(this.url + path, {
      method,
      headers: {
        authorization: `Bearer ${this.token}`,
        ...(body === undefined ? {} : { 'content-type': 'application/json' }),
      },
      body: body === undefined || typeof body === 'string' ? body : JSON.stringify(body),
      cache: 'no-store',
      credentials: 'omit',
      signal,
    });
    const text = await response.text();
    let json = null;
    try {
      json = text ? JSON.parse(text) : null;
    } catch {
      // Not JSON: a proxy's error page; reported below.
    }
    if (!response.ok) {
      const e = json?.error ?? {};
      const retry = Number(response.headers.get('retry-after')) || undefined;
      throw new ApiError(response.status, e.code ?? 'http_error', e.message ?? text.slice(0, 200), retry);
    }
    return json;
  }

  /** POST /v1/terminal/payment-intents: idempotent by `request_id` (same id, same intent). */
  createIntent({ request_id, amount, order_id }) {
    return this.request('POST', '/v1/terminal/payment-intents', { request_id, amount, order_id });
  }

  getIntent(intentId) {
    return this.request('GET', `/v1/terminal/payment-intents/${encodeURIComponent(intentId)}`);
  }

  cancelIntent(intentId) {
    return this.request('POST', `/v1/terminal/payment-intents/${encodeURIComponent(intentId)}/cancel`);
  }

  ack(intentId, seq) {
    return this.request('POST', '/v1/terminal/acks', ackJson(intentId, seq));
  }

  /** A single-use ticket for one stream. */
  async ticket() {
    return (await this.request('POST', '/v1/terminal/tickets')).ticket;
  }

  /** GET /v1/terminal/payments/{id}?wait_secs=N: the intent's status and its next confirmation. */
  poll(intentId, waitSecs, signal) {
    const path = `/v1/terminal/payments/${encodeURIComponent(intentId)}?wait_secs=${waitSecs}`;
    return this.request('GET', path, undefined, { signal });
  }

  streamUrl(path, ticket) {
    return `${this.url}${path}?ticket=${encodeURIComponent(ticket)}`;
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Receives confirmations until stop() is called, on the first of `channels` (["sse","ws","poll"]
 * by default) that works: a channel that fails to open twice in a row gives way to the next; one
 * that opened and then dropped is opened again with a fresh ticket. Long polling follows the
 * intent `currentIntent()` returns (none: it waits).
 *
 * `onConfirmation(jws, ack)` gets every message; it calls `ack(intentId, seq)` for the ones that
 * verify (over the WebSocket as a frame, else POST /v1/terminal/acks). `onStatus(channel, state,
 * detail)` reports "connecting", "open", "closed", "failed", "revoked".
 */
export function listen(gateway, { channels = ['sse', 'ws', 'poll'], onConfirmation, onStatus, currentIntent }) {
  let stopped = false;
  let close = () => {};
  const postAck = (intentId, seq) => gateway.ack(intentId, seq);

  // Resolves when the stream ends: {opened} tells whether it ever worked.
  function sse(ticket) {
    return new Promise((resolve) => {
      const source = new EventSource(gateway.streamUrl('/v1/terminal/events', ticket));
      let opened = false;
      close = () => {
        source.close();
        resolve({ opened });
      };
      source.onopen = () => {
        opened = true;
        onStatus('sse', 'open');
      };
      source.addEventListener('confirmation', (event) => onConfirmation(event.data, postAck));
      // EventSource would reconnect by itself with the same (spent) ticket: close and start over.
      source.onerror = () => close();
    });
  }

  function ws(ticket) {
    return new Promise((resolve) => {
      const url = gateway.streamUrl('/v1/terminal/ws', ticket).replace(/^http/, 'ws');
      const socket = new WebSocket(url);
      let opened = false;
      close = () => {
        socket.close();
        resolve({ opened });
      };
      socket.onopen = () => {
        opened = true;
        onStatus('ws', 'open');
      };
      const frameAck = async (intentId, seq) => {
        if (socket.readyState !== WebSocket.OPEN) return postAck(intentId, seq);
        socket.send(ackJson(intentId, seq));
      };
      socket.onmessage = (event) => {
        if (typeof event.data !== 'string') return;
        // A bad ack is answered with the house error body; confirmations are JWS.
        if (event.data.startsWith('{')) {
          console.warn('posgate:', event.data);
          return;
        }
        onConfirmation(event.data, frameAck);
      };
      socket.onclose = (event) => resolve({ opened, revoked: event.code === 1008 });
    });
  }

  async function poll() {
    const controller = new AbortController();
    let opened = false;
    close = () => controller.abort();
    onStatus('poll', 'open');
    opened = true;
    while (!stopped && !controller.signal.aborted) {
      const intentId = currentIntent();
      if (!intentId) {
        await sleep(500);
        continue;
      }
      try {
        const answer = await gateway.poll(intentId, 25, controller.signal);
        if (answer.confirmation) {
          await onConfirmation(answer.confirmation, postAck);
        } else if (answer.status !== 'awaiting_payment') {
          // Settled and acked (or another intent's confirmation comes first): ask again later.
          await sleep(2000);
        }
      } catch (e) {
        if (controller.signal.aborted) break;
        if (e instanceof ApiError && e.status === 401) return { opened, revoked: true };
        await sleep(1000);
      }
    }
    return { opened };
  }

  (async () => {
    let index = 0;
    let failures = 0;
    let backoff = 250;
    while (!stopped) {
      const channel = channels[index];
      onStatus(channel, 'connecting');
      let outcome;
      try {
        if (channel === 'poll') {
          outcome = await poll();
        } else {
          const ticket = await gateway.ticket();
          outcome = await (channel === 'sse' ? sse(ticket) : ws(ticket));
        }
      } catch (e) {
        // The ticket request failed: the gateway is down, or the token is refused.
        outcome = { opened: false, revoked: e instanceof ApiError && e.status === 401, error: e };
      }
      if (stopped) break;
      if (outcome.revoked) {
        onStatus(channel, 'revoked', 'the gateway refuses this terminal (revoked, or a wrong token)');
        return;
      }
      if (outcome.opened) {
        failures = 0;
        backoff = 250;
        onStatus(channel, 'closed');
      } else {
        failures += 1;
        onStatus(channel, 'failed', outcome.error?.message);
        if (failures >= 2 && index < channels.length - 1 && !outcome.error) {
          index += 1;
          failures = 0;
          continue;
        }
      }
      await sleep(backoff);
      backoff = Math.min(backoff * 2, 5000);
    }
  })();

  return {
    stop() {
      stopped = true;
      close();
    },
  };
}
