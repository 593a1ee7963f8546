#!/usr/bin/env python3
"""A reference posgate terminal in Python: MQTT over mutual TLS, every confirmation verified.

    posgate_terminal.py --bundle bundle.json --state state.json [--mqtt HOST:PORT]
                        [--key key.pem] [--charge 4.40 --order ord-0042]
    posgate_terminal.py --new-key key.pem > request.csr
    posgate_terminal.py --check-vectors proto/testdata/confirmation-vectors.json

A terminal whose key must never leave it makes the key itself: --new-key writes a new P-256 key
(mode 0600) and prints a certificate request (PKCS#10) for it; the operator provisions the
terminal with that request (`csr_pem` in `POST /v1/terminals`, or a renewal), and the bundle then
has no `key_pem`: the terminal runs with --key.

The bundle is what `POST /v1/terminals` on posgate's admin API answered. The terminal connects with
the bundle's client certificate (client id = the certificate's CN = the terminal id), leaves a last
will `{"state":"offline"}` on its status topic, subscribes to its payments, and for every message:

  1. verifies it (verify() below: the rules of docs/interfaces.md, "Confirmations (JWS)");
  2. shows it once: a `seq` above the last one shown is new, anything else a repeat;
  3. writes that `seq` to the state file (fsync) before acking, so a reboot never shows it again;
  4. acks it, repeats included: the gateway sends the next confirmation only after this one is
     acked, so a terminal silent on a repeat would stall its own queue.

A message that fails verification is refused, never shown, never acked.

With --charge, the terminal also starts a payment: `create_intent` over MQTT RPC, with a request id
made from the order id, so asking again after a reboot gives the same intent, never a second one.

Output is one line per event on stdout, for people and for tests:

    READY pos-01                              connected and subscribed
    SHOW PAID seq=3 intent=pi_… amount=4.40 usd order=…
    REPEAT seq=3 intent=pi_…                  already shown: acked again, not shown
    ACKED seq=3 intent=pi_…                   the broker has the ack (PUBACK)
    REFUSED BadSignature topic=…: …           failed verification: dropped
    INTENT pi_… amount=4.40 expires_at=…      --charge: the intent was created; then
    QR ethereum:0x…@84532/transfer?…          what the customer scans
    RPC_ERROR rate_limited: …                 --charge: the gateway's answer was an error
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import signal
import socket
import ssl
import sys
import tempfile
from urllib.parse import urlsplit

try:
    import paho.mqtt.client as mqtt
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
except ImportError as e:  # pragma: no cover - the message is the point
    sys.exit(f"posgate_terminal: {e}; install the pinned packages: "
             "pip install -r clients/python/requirements.txt")

KEEPALIVE_SECS = 30
OFFLINE = json.dumps({"state": "offline"})
ONLINE = json.dumps({"state": "online"})


# === verification =================================================================================

class Refused(Exception):
    """A confirmation that must not be shown. `reason` is the name posgate's verifier uses
    (Malformed, BadAlg, BadSignature, BadPayload, WrongTerminal, OldSeq)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def b64url_decode(part: str) -> bytes:
    """Strict base64url without padding. Python's own decoder forgives padding, the standard
    alphabet and non-zero unused bits; a second encoding of the same bytes must not verify."""
    if not _B64URL.fullmatch(part) or len(part) % 4 == 1:
        raise ValueError("not base64url without padding")
    raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != part:
        raise ValueError("non-zero unused bits")
    return raw


def gateway_key(jwk: dict) -> Ed25519PublicKey:
    """The gateway's public key from the bundle's `gateway_jwk` (kty OKP, crv Ed25519)."""
    if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
        raise ValueError(f"gateway_jwk is {jwk.get('kty')}/{jwk.get('crv')}, not OKP/Ed25519")
    x = b64url_decode(jwk.get("x", ""))
    if len(x) != 32:
        raise ValueError("gateway_jwk x is not 32 bytes")
    return Ed25519PublicKey.from_public_bytes(x)


def _uint(value, bits: int) -> bool:
    # bool is an int in Python; JSON true is not a number.
    return type(value) is int and 0 <= value < 2 ** bits


_STATUSES = {"confirmed", "expired", "cancelled", "unresolved"}
_CONTEXTS = {"late", "underpaid", "overpaid", "multiple"}
# name -> (required, check)
_FIELDS = {
    "v": (True, lambda x: _uint(x, 32)),
    "terminal_id": (True, lambda x: isinstance(x, str)),
    "intent_id": (True, lambda x: isinstance(x, str)),
    "seq": (True, lambda x: _uint(x, 64)),
    "status": (True, lambda x: x in _STATUSES),
    "context": (False, lambda x: x in _CONTEXTS),
    "amount": (True, lambda x: isinstance(x, str)),
    "amount_micros": (True, lambda x: _uint(x, 64)),
    "currency": (True, lambda x: isinstance(x, str)),
    "order_id": (False, lambda x: isinstance(x, str)),
    "tx_hash": (False, lambda x: isinstance(x, str)),
    "issued_at": (True, lambda x: isinstance(x, str)),
}


def verify(jws: str, key: Ed25519PublicKey, terminal_id: str, min_seq: int) -> dict:
    """Verifies a confirmation for `terminal_id` and returns its payload (known members only).

    The checks run in the order of posgate_proto::confirmation::verify, and nothing in the
    payload is looked at before the signature checks out. `min_seq`: a `seq` below it is a replay.
    Raises Refused.
    """
    parts = jws.split(".")
    if len(parts) != 3:
        raise Refused("Malformed", f"{len(parts)} parts, not 3")
    header_b64, payload_b64, sig_b64 = parts
    try:
        header = json.loads(b64url_decode(header_b64))
    except ValueError as e:
        raise Refused("Malformed", f"header: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("alg"), str):
        raise Refused("Malformed", "header is not a JSON object with a string alg")
    # Only EdDSA, decided before any key is used (no `none`, no HS256 with the public key as
    # secret). `crit` lists extensions the recipient must understand: we understand none.
    if header["alg"] != "EdDSA":
        raise Refused("BadAlg", f"alg {header['alg']!r}")
    if "crit" in header:
        raise Refused("BadAlg", "crit header present")
    try:
        payload_bytes = b64url_decode(payload_b64)
        signature = b64url_decode(sig_b64)
    except ValueError as e:
        raise Refused("Malformed", str(e)) from None
    if len(signature) != 64:
        raise Refused("BadSignature", f"{len(signature)}-byte signature")
    try:
        # The signing input is the first two parts exactly as received (never re-serialised).
        # OpenSSL refuses an S that is not below the group order, as RFC 8032 requires.
        key.verify(signature, f"{header_b64}.{payload_b64}".encode("ascii"))
    except InvalidSignature:
        raise Refused("BadSignature", "does not verify with the gateway key") from None
    try:
        payload = json.loads(payload_bytes)
    except ValueError as e:
        raise Refused("BadPayload", f"not JSON: {e}") from None
    if not isinstance(payload, dict):
        raise Refused("BadPayload", "not a JSON object")
    out = {}
    for name, (required, ok) in _FIELDS.items():
        value = payload.get(name)
        if value is None:  # absent, or null for an optional member
            if required:
                raise Refused("BadPayload", f"{name} missing")
            continue
        if not ok(value):
            raise Refused("BadPayload", f"{name} is {value!r}")
        out[name] = value
    if out["v"] != 1:
        raise Refused("BadPayload", f"version {out['v']}")
    if out["terminal_id"] != terminal_id:
        raise Refused("WrongTerminal", f"for terminal {out['terminal_id']!r}")
    if out["seq"] < min_seq:
        raise Refused("OldSeq", f"seq {out['seq']} below {min_seq}")
    return out


def headline(c: dict) -> str:
    """What the cashier sees."""
    if c["status"] == "confirmed":
        return "PAID"
    if c["status"] == "unresolved":
        return {"underpaid": "UNDERPAID", "overpaid": "OVERPAID", "late": "PAID_LATE",
                "multiple": "PAID_MORE_THAN_ONCE"}.get(c.get("context"), "UNRESOLVED")
    return c["status"].upper()  # EXPIRED, CANCELLED


# === the state file ===============================================================================

class State:
    """The last `seq` shown, kept in a small JSON file that survives reboots."""

    def __init__(self, path: str, terminal_id: str):
        self.path = path
        self.terminal_id = terminal_id
        self.last_shown_seq = 0
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
        except FileNotFoundError:
            return
        except ValueError as e:
            # Starting from 0 would show every confirmation still queued as new: stop instead.
            raise SystemExit(f"state file {path} is not JSON ({e}); fix or remove it")
        if saved.get("terminal_id") != terminal_id or not _uint(saved.get("last_shown_seq"), 64):
            raise SystemExit(f"state file {path} belongs to terminal {saved.get('terminal_id')!r} "
                             f"or has no last_shown_seq; this is {terminal_id!r}")
        self.last_shown_seq = saved["last_shown_seq"]

    def save(self, seq: int) -> None:
        """Durably: write a temporary file, fsync it, rename it over the old one, fsync the
        directory. A power cut leaves the old file or the new one, never half of one."""
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"terminal_id": self.terminal_id, "last_shown_seq": seq}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.last_shown_seq = seq


# === the terminal =================================================================================

def say(line: str) -> None:
    print(line, flush=True)


def new_key(path: str) -> str:
    """Writes a new P-256 key to `path` (0600, never over an existing file) and returns a
    certificate request for it. The gateway takes only the public key from it (it sets the
    subject itself), so the subject here is a placeholder."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "posgate-terminal")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def tls_context(bundle: dict, key_file: str | None = None) -> ssl.SSLContext:
    """Trusts only the gateway CA and presents the terminal's certificate, with the bundle's key
    or, for a terminal provisioned from its own request, the key in `key_file`. The ssl module
    loads a certificate and key from files only: the bundle's live in a private directory for the
    call."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=bundle["ca_pem"])
    with tempfile.TemporaryDirectory(prefix="posgate-terminal-") as tmp:
        cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        files = [(cert, bundle["cert_pem"])]
        if key_file is None:
            if "key_pem" not in bundle:
                raise SystemExit("the bundle has no key_pem (provisioned from a CSR): pass --key")
            files.append((key, bundle["key_pem"]))
        else:
            key = key_file
        for path, pem in files:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(pem)
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as e:
            # Said at start, rather than as a TLS failure on every reconnect.
            which = key_file or "the bundle's key_pem"
            raise SystemExit(f"{which} is not the key of the bundle's certificate ({e})") from None
    return ctx


class Terminal:
    def __init__(
        self,
        bundle: dict,
        state: State,
        charge: dict | None = None,
        key_file: str | None = None,
    ):
        self.bundle = bundle
        self.charge = charge  # create_intent params, until it is answered
        # Made from the order id, so the same sale asked again (after a reboot) is the same request.
        self.charge_id = f"charge-{charge['order_id']}" if charge else None
        self.topics = bundle["topics"]
        self.terminal_id = bundle["terminal_id"]
        self.key = gateway_key(bundle["gateway_jwk"])
        self.state = state
        self.pending_acks: dict[int, str] = {}  # MQTT message id -> "seq=… intent=…"
        self.stopping = False
        # The broker requires client id = certificate CN = terminal id (the bundle's client_id).
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=bundle["client_id"],
                                  clean_session=True, protocol=mqtt.MQTTv311)
        self.client.tls_set_context(tls_context(bundle, key_file))
        # Retained, QoS 1, on the terminal's own status topic: anything else is refused.
        self.client.will_set(self.topics["status"], OFFLINE, qos=1, retain=True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.on_socket_open = self.on_socket_open
        self.client.on_connect = self.on_connect
        self.client.on_subscribe = self.on_subscribe
        self.client.on_message = self.on_message
        self.client.on_publish = self.on_publish
        self.client.on_disconnect = self.on_disconnect

    def run(self, host: str, port: int) -> None:
        self.client.connect_async(host, port, keepalive=KEEPALIVE_SECS)
        self.client.loop_forever(retry_first_connection=True)

    def stop(self) -> None:
        self.stopping = True
        # A clean DISCONNECT suppresses the last will: say offline ourselves first.
        self.client.publish(self.topics["status"], OFFLINE, qos=1, retain=True)
        self.client.disconnect()

    @staticmethod
    def on_socket_open(client, userdata, sock) -> None:
        # Nagle off: the PUBACK and the ack are two small writes; with Nagle the ack waits for
        # the broker's delayed TCP ACK (up to 40 ms on Linux).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            print(f"connect refused: {reason_code}", file=sys.stderr, flush=True)
            return
        # Clean session: subscribe again after every (re)connect. Retained confirmations that
        # are not acked yet arrive right after the SUBACK.
        client.subscribe([(self.topics["payments"], 1), (self.topics["rpc_res"], 1)])
        client.publish(self.topics["status"], ONLINE, qos=1, retain=True)

    def on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if any(rc.is_failure for rc in reason_codes):
            # Not a state to stay in: connected but deaf. A broker may refuse for a while (NATS
            # does while it elects a leader after a node's loss): drop the connection; paho
            # connects again after its delay and on_connect subscribes again.
            print("subscription refused; reconnecting", file=sys.stderr, flush=True)
            sock = client.socket()
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
            return
        say(f"READY {self.terminal_id}")
        if self.charge:
            # Sent again after every reconnect until answered: the same request id gets the
            # same answer, and one intent at the provider.
            request = {"id": self.charge_id, "method": "create_intent", "params": self.charge}
            client.publish(self.topics["rpc_req"], json.dumps(request), qos=1)

    def on_rpc_reply(self, payload: bytes) -> None:
        try:
            reply = json.loads(payload)
        except ValueError:
            return
        if not self.charge or reply.get("id") != self.charge_id:
            return
        self.charge = None
        if "error" in reply:
            error = reply["error"]
            say(f"RPC_ERROR {error.get('code')}: {error.get('message')}")
            return
        result = reply["result"]
        say(f"INTENT {result['intent_id']} amount={result['amount']} "
            f"expires_at={result['expires_at']}")
        say(f"QR {result['qr_payload']}")

    def on_message(self, client, userdata, message) -> None:
        if message.topic == self.topics["rpc_res"]:
            self.on_rpc_reply(message.payload)
            return
        # The gateway clears an acked confirmation with an empty retained publish.
        if not message.payload:
            return
        try:
            jws = message.payload.decode("ascii")
        except UnicodeDecodeError:
            say(f"REFUSED Malformed topic={message.topic}: not ASCII")
            return
        try:
            c = verify(jws, self.key, self.terminal_id, self.state.last_shown_seq + 1)
            new = True
        except Refused as e:
            if e.reason != "OldSeq":
                say(f"REFUSED {e.reason} topic={message.topic}: {e.detail}")
                return
            # Signature and terminal_id checked out (they come before seq): a confirmation
            # already shown, sent again. Ack it, do not show it.
            c = verify(jws, self.key, self.terminal_id, 0)
            new = False
        what = f"seq={c['seq']} intent={c['intent_id']}"
        if new:
            order = f" order={c['order_id']}" if "order_id" in c else ""
            say(f"SHOW {headline(c)} {what} amount={c['amount']} {c['currency']}{order}")
            self.state.save(c["seq"])
        else:
            say(f"REPEAT {what}")
        ack = json.dumps({"intent_id": c["intent_id"], "seq": c["seq"]})
        # Callbacks all run on the network loop's thread, so on_publish (at the PUBACK) comes
        # after this returns.
        info = client.publish(self.topics["acks"], ack, qos=1)
        self.pending_acks[info.mid] = what

    def on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        what = self.pending_acks.pop(mid, None)
        if what is not None:
            say(f"ACKED {what}")

    def on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if not self.stopping:
            print(f"disconnected: {reason_code}; reconnecting", file=sys.stderr, flush=True)


# === test vectors =================================================================================

def check_vectors(path: str) -> int:
    """Runs every case of proto/testdata/confirmation-vectors.json; 0 when all pass."""
    with open(path, encoding="utf-8") as f:
        vectors = json.load(f)
    key = gateway_key(vectors["key"]["jwk"])
    failed = 0
    for case in vectors["cases"]:
        name, expect = case["name"], case["expect"]
        try:
            got = verify(case["jws"], key, case["terminal_id"], case["min_seq"])
            outcome = "ok" if got == case.get("payload") else f"ok, but payload {got}"
        except Refused as e:
            outcome = e.reason
        if outcome == expect:
            say(f"pass {name} ({expect})")
        else:
            failed += 1
            say(f"FAIL {name}: expected {expect}, got {outcome}")
    say(f"{len(vectors['cases']) - failed} passed, {failed} failed")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", help="the provisioning bundle (JSON) from POST /v1/terminals")
    parser.add_argument("--state", help="where the last shown seq is kept")
    parser.add_argument("--mqtt", metavar="HOST:PORT", help="instead of the bundle's mqtt_url")
    parser.add_argument("--charge", metavar="AMOUNT", help="start a payment of AMOUNT (4.40)")
    parser.add_argument("--order", metavar="ORDER_ID", help="the order id of --charge")
    parser.add_argument("--check-vectors", metavar="FILE", help="run the test vectors and exit")
    parser.add_argument("--key", metavar="FILE", help="the terminal's own key (bundle without key_pem)")
    parser.add_argument(
        "--new-key", metavar="FILE", help="write a new key to FILE, print its CSR and exit"
    )
    args = parser.parse_args()
    if args.check_vectors:
        return check_vectors(args.check_vectors)
    if args.new_key:
        sys.stdout.write(new_key(args.new_key))
        return 0
    if not args.bundle or not args.state:
        parser.error("--bundle and --state are required (or --check-vectors)")
    with open(args.bundle, encoding="utf-8") as f:
        bundle = json.load(f)
    if args.mqtt:
        host, _, port = args.mqtt.rpartition(":")
    else:
        url = urlsplit(bundle["mqtt_url"])  # mqtts://host:port
        host, port = url.hostname, url.port or 8883
    if bool(args.charge) != bool(args.order):
        parser.error("--charge and --order go together")
    charge = {"amount": args.charge, "order_id": args.order} if args.charge else None
    terminal = Terminal(bundle, State(args.state, bundle["terminal_id"]), charge, args.key)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: terminal.stop())
    terminal.run(host, int(port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
