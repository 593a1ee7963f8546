package posgate.terminal;

import com.google.gson.Gson;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonPrimitive;
import com.google.gson.TypeAdapter;
import com.google.gson.stream.JsonReader;
import com.google.gson.stream.JsonToken;
import java.io.IOException;
import java.io.StringReader;
import java.math.BigInteger;
import java.nio.ByteBuffer;
import java.nio.charset.CharacterCodingException;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.StandardCharsets;
import java.security.GeneralSecurityException;
import java.security.InvalidKeyException;
import java.security.KeyFactory;
import java.security.PublicKey;
import java.security.Signature;
import java.security.SignatureException;
import java.security.spec.X509EncodedKeySpec;
import java.util.Base64;
import java.util.HashSet;
import java.util.Map;
import java.util.Set;
import java.util.regex.Pattern;

/**
 * Verifies posgate's signed payment confirmations with the JDK alone (Ed25519 since JDK 15) and
 * Gson: the rules of docs/interfaces.md, "Confirmations (JWS)", in the order of
 * posgate_proto::confirmation::verify. Nothing of the payload is looked at before the signature
 * checks out. No MQTT here: an Android app takes this class as it is and feeds it what its own
 * MQTT client receives.
 */
public final class Confirmations {
    private Confirmations() {}

    /**
     * A confirmation that must not be shown. {@code reason} is the name posgate's verifier uses
     * (Malformed, BadAlg, BadSignature, BadPayload, WrongTerminal, OldSeq).
     */
    public static final class Refused extends Exception {
        private static final long serialVersionUID = 1L;

        public final String reason;
        public final String detail;

        Refused(String reason, String detail) {
            super(reason + ": " + detail);
            this.reason = reason;
            this.detail = detail;
        }
    }

    /** A verified confirmation. Integers are exact: {@code seq} is a u64 and may pass 2^63. */
    public record Confirmation(
            JsonObject payload,
            String terminalId,
            String intentId,
            BigInteger seq,
            String status,
            String context,
            String amount,
            String currency,
            String orderId) {

        /** What the cashier sees. */
        public String headline() {
            switch (status) {
                case "confirmed":
                    return "PAID";
                case "unresolved":
                    if (context == null) return "UNRESOLVED";
                    return Map.of(
                                    "underpaid", "UNDERPAID",
                                    "overpaid", "OVERPAID",
                                    "late", "PAID_LATE",
                                    "multiple", "PAID_MORE_THAN_ONCE")
                            .get(context);
                default:
                    return status.toUpperCase(java.util.Locale.ROOT); // EXPIRED, CANCELLED
            }
        }
    }

    static final BigInteger U32_MAX = BigInteger.ONE.shiftLeft(32).subtract(BigInteger.ONE);
    static final BigInteger U64_MAX = BigInteger.ONE.shiftLeft(64).subtract(BigInteger.ONE);
    private static final Pattern B64URL = Pattern.compile("[A-Za-z0-9_-]*");
    private static final Pattern INTEGER = Pattern.compile("-?[0-9]+");
    private static final Set<String> STATUSES =
            Set.of("confirmed", "expired", "cancelled", "unresolved");
    private static final Set<String> CONTEXTS = Set.of("late", "underpaid", "overpaid", "multiple");
    // The payload members posgate defines; others are ignored.
    static final String[] MEMBERS = {
        "v", "terminal_id", "intent_id", "seq", "status", "context", "amount", "amount_micros",
        "currency", "order_id", "tx_hash", "issued_at"
    };
    // The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): the JDK imports a raw key
    // through it.
    private static final byte[] ED25519_SPKI = {
        0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00
    };
    private static final TypeAdapter<JsonElement> ELEMENT = new Gson().getAdapter(JsonElement.class);

    /**
     * Strict base64url without padding. The JDK's decoder forgives padding and non-zero unused
     * bits; a second encoding of the same bytes must not verify.
     */
    static byte[] base64url(String part) {
        if (!B64URL.matcher(part).matches() || part.length() % 4 == 1) {
            throw new IllegalArgumentException("not base64url without padding");
        }
        byte[] raw = Base64.getUrlDecoder().decode(part);
        if (!Base64.getUrlEncoder().withoutPadding().encodeToString(raw).equals(part)) {
            throw new IllegalArgumentException("non-zero unused bits");
        }
        return raw;
    }

    /** The gateway's public key from the bundle's {@code gateway_jwk} (kty OKP, crv Ed25519). */
    public static PublicKey gatewayKey(JsonObject jwk) throws GeneralSecurityException {
        if (!"OKP".equals(string(jwk, "kty")) || !"Ed25519".equals(string(jwk, "crv"))) {
            throw new InvalidKeyException("gateway_jwk is not OKP/Ed25519");
        }
        byte[] x;
        try {
            x = base64url(string(jwk, "x") == null ? "" : string(jwk, "x"));
        } catch (IllegalArgumentException e) {
            throw new InvalidKeyException("gateway_jwk x: " + e.getMessage());
        }
        if (x.length != 32) throw new InvalidKeyException("gateway_jwk x is not 32 bytes");
        byte[] der = new byte[ED25519_SPKI.length + 32];
        System.arraycopy(ED25519_SPKI, 0, der, 0, ED25519_SPKI.length);
        System.arraycopy(x, 0, der, ED25519_SPKI.length, 32);
        return KeyFactory.getInstance("Ed25519").generatePublic(new X509EncodedKeySpec(der));
    }

    private static String string(JsonObject o, String name) {
        JsonElement e = o.get(name);
        return e != null && e.isJsonPrimitive() && e.getAsJsonPrimitive().isString()
                ? e.getAsString()
                : null;
    }

    /**
     * Parses a JSON object strictly: one object and nothing after it, no member twice at its top
     * level (which one would count is parser-dependent), numbers kept as their text (Gson's
     * LazilyParsedNumber), so integers are read exactly.
     */
    static JsonObject parseObject(String text) throws IOException {
        JsonReader reader = new JsonReader(new StringReader(text));
        reader.setLenient(false);
        JsonObject object = new JsonObject();
        Set<String> seen = new HashSet<>();
        reader.beginObject();
        while (reader.hasNext()) {
            String name = reader.nextName();
            if (!seen.add(name)) throw new IOException("member " + name + " twice");
            // The adapter reads with the reader's own (strict) setting.
            object.add(name, ELEMENT.read(reader));
        }
        reader.endObject();
        if (reader.peek() != JsonToken.END_DOCUMENT) throw new IOException("data after the object");
        return object;
    }

    /** An integer in [0, max], read from the number's text: 7.0, 7e0 or true is not one. */
    static BigInteger unsigned(JsonElement e, BigInteger max) {
        if (e == null || !e.isJsonPrimitive() || !e.getAsJsonPrimitive().isNumber()) return null;
        String text = e.getAsJsonPrimitive().getAsString();
        if (!INTEGER.matcher(text).matches()) return null;
        BigInteger value = new BigInteger(text);
        return value.signum() >= 0 && value.compareTo(max) <= 0 ? value : null;
    }

    private static String utf8(byte[] bytes) throws CharacterCodingException {
        return StandardCharsets.UTF_8
                .newDecoder()
                .onMalformedInput(CodingErrorAction.REPORT)
                .onUnmappableCharacter(CodingErrorAction.REPORT)
                .decode(ByteBuffer.wrap(bytes))
                .toString();
    }

    /**
     * Verifies a confirmation (a compact JWS) for {@code terminalId}: a {@code seq} below
     * {@code minSeq} is a replay (OldSeq).
     *
     * @throws Refused naming the first check that failed
     */
    public static Confirmation verify(String jws, PublicKey key, String terminalId, BigInteger minSeq)
            throws Refused {
        String[] parts = jws.split("\\.", -1);
        if (parts.length != 3) throw new Refused("Malformed", parts.length + " parts, not 3");
        JsonObject header;
        try {
            header = parseObject(utf8(base64url(parts[0])));
        } catch (IOException | IllegalArgumentException | IllegalStateException e) {
            throw new Refused("Malformed", "header: " + e.getMessage());
        }
        JsonElement alg = header.get("alg");
        if (alg == null || !alg.isJsonPrimitive() || !alg.getAsJsonPrimitive().isString()) {
            throw new Refused("Malformed", "header has no string alg");
        }
        // Only EdDSA, decided before the key is used (no `none`, no HS256 with the public key as
        // secret). `crit` lists extensions the recipient must understand: we understand none.
        if (!"EdDSA".equals(alg.getAsString())) {
            throw new Refused("BadAlg", "alg " + alg.getAsString());
        }
        if (header.has("crit")) throw new Refused("BadAlg", "crit header present");
        byte[] payloadBytes;
        byte[] signature;
        try {
            payloadBytes = base64url(parts[1]);
            signature = base64url(parts[2]);
        } catch (IllegalArgumentException e) {
            throw new Refused("Malformed", e.getMessage());
        }
        if (signature.length != 64) {
            throw new Refused("BadSignature", signature.length + "-byte signature");
        }
        try {
            // The signing input is the first two parts exactly as received (never
            // re-serialised). The JDK refuses an S not below the group order (RFC 8032).
            Signature ed25519 = Signature.getInstance("Ed25519");
            ed25519.initVerify(key);
            ed25519.update((parts[0] + "." + parts[1]).getBytes(StandardCharsets.US_ASCII));
            if (!ed25519.verify(signature)) {
                throw new Refused("BadSignature", "does not verify with the gateway key");
            }
        } catch (SignatureException e) {
            throw new Refused("BadSignature", e.getMessage());
        } catch (GeneralSecurityException e) {
            throw new IllegalStateException("this JDK has no Ed25519 (JDK 15 or later)", e);
        }
        JsonObject p;
        try {
            p = parseObject(utf8(payloadBytes));
        } catch (IOException | IllegalStateException e) {
            throw new Refused("BadPayload", "not a JSON object: " + e.getMessage());
        }
        return checkPayload(p, terminalId, minSeq);
    }

    private static Confirmation checkPayload(JsonObject p, String terminalId, BigInteger minSeq)
            throws Refused {
        JsonObject known = new JsonObject();
        for (String name : MEMBERS) {
            JsonElement value = p.get(name);
            if (value == null || value.isJsonNull()) { // absent, or null for an optional member
                boolean optional =
                        name.equals("context") || name.equals("order_id") || name.equals("tx_hash");
                if (!optional) throw new Refused("BadPayload", name + " missing");
                continue;
            }
            boolean ok;
            switch (name) {
                case "v":
                case "seq":
                case "amount_micros":
                    // Kept as the value read, not the text: what the terminal acts on.
                    BigInteger number = unsigned(value, name.equals("v") ? U32_MAX : U64_MAX);
                    ok = number != null;
                    if (ok) value = new JsonPrimitive(number);
                    break;
                case "status":
                    ok = isString(value) && STATUSES.contains(value.getAsString());
                    break;
                case "context":
                    ok = isString(value) && CONTEXTS.contains(value.getAsString());
                    break;
                default:
                    ok = isString(value);
            }
            if (!ok) throw new Refused("BadPayload", name + " is " + value);
            known.add(name, value);
        }
        if (!unsigned(known.get("v"), U32_MAX).equals(BigInteger.ONE)) {
            throw new Refused("BadPayload", "version " + known.get("v"));
        }
        String forTerminal = known.get("terminal_id").getAsString();
        if (!forTerminal.equals(terminalId)) {
            throw new Refused("WrongTerminal", "for terminal " + forTerminal);
        }
        BigInteger seq = unsigned(known.get("seq"), U64_MAX);
        if (seq.compareTo(minSeq) < 0) {
            throw new Refused("OldSeq", "seq " + seq + " below " + minSeq);
        }
        return new Confirmation(
                known,
                forTerminal,
                known.get("intent_id").getAsString(),
                seq,
                known.get("status").getAsString(),
                known.has("context") ? known.get("context").getAsString() : null,
                known.get("amount").getAsString(),
                known.get("currency").getAsString(),
                known.has("order_id") ? known.get("order_id").getAsString() : null);
    }

    private static boolean isString(JsonElement e) {
        return e.isJsonPrimitive() && ((JsonPrimitive) e).isString();
    }
}
