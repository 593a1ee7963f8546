package posgate.terminal;

import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonPrimitive;
import java.io.ByteArrayInputStream;
import java.io.IOException;
import java.math.BigInteger;
import java.net.URI;
import java.nio.ByteBuffer;
import java.nio.channels.FileChannel;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.NoSuchFileException;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.nio.file.StandardOpenOption;
import java.security.KeyFactory;
import java.security.KeyManagementException;
import java.security.KeyStore;
import java.security.PrivateKey;
import java.security.PublicKey;
import java.security.SecureRandom;
import java.security.Signature;
import java.security.cert.Certificate;
import java.security.cert.CertificateFactory;
import java.security.cert.X509Certificate;
import java.security.spec.PKCS8EncodedKeySpec;
import java.util.Base64;
import java.util.List;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import javax.net.ssl.KeyManager;
import javax.net.ssl.KeyManagerFactory;
import javax.net.ssl.SSLContext;
import javax.net.ssl.SSLContextSpi;
import javax.net.ssl.SSLEngine;
import javax.net.ssl.SSLParameters;
import javax.net.ssl.SSLServerSocketFactory;
import javax.net.ssl.SSLSessionContext;
import javax.net.ssl.SSLSocketFactory;
import javax.net.ssl.TrustManager;
import javax.net.ssl.TrustManagerFactory;
import org.fusesource.mqtt.client.Future;
import org.fusesource.mqtt.client.FutureConnection;
import org.fusesource.mqtt.client.MQTT;
import org.fusesource.mqtt.client.Message;
import org.fusesource.mqtt.client.QoS;
import org.fusesource.mqtt.client.Topic;

/**
 * A reference posgate terminal on the JVM (Java 17): MQTT over mutual TLS (FuseSource's
 * mqtt-client, Debian libmqtt-client-java), every confirmation verified with the JDK's Ed25519
 * ({@link Confirmations}), JSON with Gson (Debian libgoogle-gson-java).
 *
 * <pre>
 *   java -cp CLASSPATH posgate.terminal.Terminal --bundle bundle.json --state state.json
 *        [--mqtt HOST:PORT] [--key key.pem]
 *   java -cp CLASSPATH posgate.terminal.Terminal --check-vectors confirmation-vectors.json
 * </pre>
 *
 * <p>The bundle is what {@code POST /v1/terminals} on posgate's admin API answered. The terminal
 * connects with the bundle's client certificate (client id = the certificate's CN = the terminal
 * id), leaves a last will {@code {"state":"offline"}} on its status topic, subscribes to its
 * payments, and for every message: verifies it; shows it once (a {@code seq} above the last one
 * shown is new, anything else a repeat); writes that {@code seq} to the state file (fsync, atomic
 * rename) before acking, so a reboot never shows it again; acks it, repeats included (the gateway
 * sends the next confirmation only after this one is acked). A message that fails verification
 * is never shown and never acked. {@code --key}: the terminal's own PKCS#8 key, for a bundle
 * provisioned from a CSR (no {@code key_pem}).
 *
 * <p>Output, one line per event on stdout (the same as clients/python and clients/c): {@code
 * READY pos-01}, {@code SHOW PAID seq=3 intent=pi_… amount=4.40 usd order=…}, {@code REPEAT
 * seq=3 intent=pi_…}, {@code ACKED seq=3 intent=pi_…}, {@code REFUSED BadSignature topic=…: …}.
 */
public final class Terminal {
    static final short KEEPALIVE_SECS = 30;
    static final byte[] OFFLINE = "{\"state\":\"offline\"}".getBytes(StandardCharsets.UTF_8);
    static final byte[] ONLINE = "{\"state\":\"online\"}".getBytes(StandardCharsets.UTF_8);
    // How long a publish may wait for its PUBACK before the connection counts as dead.
    static final long PUBACK_SECS = 10;

    private final JsonObject bundle;
    private final JsonObject topics;
    private final String terminalId;
    private final PublicKey gatewayKey;
    private final SSLContext tls;
    private final State state;
    private volatile boolean stopping;

    Terminal(JsonObject bundle, State state, SSLContext tls) throws Exception {
        this.bundle = bundle;
        this.topics = bundle.getAsJsonObject("topics");
        this.terminalId = bundle.get("terminal_id").getAsString();
        this.gatewayKey = Confirmations.gatewayKey(bundle.getAsJsonObject("gateway_jwk"));
        this.tls = tls;
        this.state = state;
    }

    static void say(String line) {
        System.out.println(line);
        System.out.flush();
    }

    private String topic(String name) {
        return topics.get(name).getAsString();
    }

    // === the connection ==========================================================================

    private FutureConnection connect(String host, int port) throws Exception {
        MQTT mqtt = new MQTT();
        // hawtdispatch turns Nagle off on every socket (TCP_NODELAY): the PUBACK and the ack are
        // two small writes, and with Nagle the ack would wait for the broker's delayed ACK.
        mqtt.setHost(new URI("tls", null, host, port, null, null, null));
        mqtt.setSslContext(tls);
        mqtt.setVersion("3.1.1");
        // The broker requires client id = certificate CN = terminal id (the bundle's client_id).
        mqtt.setClientId(bundle.get("client_id").getAsString());
        // Clean session: subscribe again after every connect; what is not acked is retained and
        // arrives right after the SUBACK.
        mqtt.setCleanSession(true);
        mqtt.setKeepAlive(KEEPALIVE_SECS);
        // Retained, QoS 1, on the terminal's own status topic: anything else is refused.
        mqtt.setWillTopic(topic("status"));
        mqtt.setWillMessage(new String(OFFLINE, StandardCharsets.UTF_8));
        mqtt.setWillQos(QoS.AT_LEAST_ONCE);
        mqtt.setWillRetain(true);
        // Reconnecting (with a backoff, and a new subscription) is run(): the library's own
        // would resume without subscribing again.
        mqtt.setConnectAttemptsMax(1);
        mqtt.setReconnectAttemptsMax(0);
        FutureConnection connection = mqtt.futureConnection();
        connection.connect().await(PUBACK_SECS, TimeUnit.SECONDS);
        byte[] granted =
                connection
                        .subscribe(new Topic[] {new Topic(topic("payments"), QoS.AT_LEAST_ONCE)})
                        .await(PUBACK_SECS, TimeUnit.SECONDS);
        if (granted.length != 1 || (granted[0] & 0x80) != 0) {
            connection.kill();
            throw new IOException("subscription refused");
        }
        connection
                .publish(topic("status"), ONLINE, QoS.AT_LEAST_ONCE, true)
                .await(PUBACK_SECS, TimeUnit.SECONDS);
        return connection;
    }

    /** Connects, reconnects after any failure (1 s, doubling up to 30 s), until stop(). */
    void run(String host, int port) {
        long backoffSecs = 1;
        while (!stopping) {
            FutureConnection connection = null;
            try {
                connection = connect(host, port);
                say("READY " + terminalId);
                backoffSecs = 1;
                Future<Message> next = connection.receive();
                while (!stopping) {
                    Message message;
                    try {
                        message = next.await(250, TimeUnit.MILLISECONDS);
                    } catch (TimeoutException e) {
                        if (!connection.isConnected()) throw new IOException("connection lost");
                        continue;
                    }
                    next = connection.receive();
                    onMessage(connection, message);
                    message.ack();
                }
                // A clean DISCONNECT suppresses the last will: say offline ourselves first.
                connection
                        .publish(topic("status"), OFFLINE, QoS.AT_LEAST_ONCE, true)
                        .await(PUBACK_SECS, TimeUnit.SECONDS);
                // The library's DISCONNECT future did not complete against posgate's broker in
                // testing (it waited out any timeout): give it a moment, then close the socket.
                try {
                    connection.disconnect().await(1, TimeUnit.SECONDS);
                } catch (TimeoutException e) {
                    connection.kill();
                }
            } catch (Exception e) {
                if (connection != null) connection.kill();
                if (stopping) break;
                System.err.println("disconnected: " + e + "; reconnecting in " + backoffSecs + " s");
                pause(backoffSecs);
                backoffSecs = Math.min(backoffSecs * 2, 30);
            }
        }
    }

    private void pause(long secs) {
        long until = System.nanoTime() + TimeUnit.SECONDS.toNanos(secs);
        while (!stopping && System.nanoTime() < until) {
            try {
                Thread.sleep(100);
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
                return;
            }
        }
    }

    void stop() {
        stopping = true;
    }

    private void onMessage(FutureConnection connection, Message message) throws Exception {
        byte[] payload = message.getPayload();
        // The gateway clears an acked confirmation with an empty retained publish.
        if (payload.length == 0) return;
        for (byte b : payload) {
            if (b < 0) {
                say("REFUSED Malformed topic=" + message.getTopic() + ": not ASCII");
                return;
            }
        }
        String jws = new String(payload, StandardCharsets.US_ASCII);
        Confirmations.Confirmation c;
        boolean isNew = true;
        try {
            c = Confirmations.verify(jws, gatewayKey, terminalId, state.lastShown.add(BigInteger.ONE));
        } catch (Confirmations.Refused e) {
            if (!e.reason.equals("OldSeq")) {
                say("REFUSED " + e.reason + " topic=" + message.getTopic() + ": " + e.detail);
                return;
            }
            // Signature and terminal_id checked out (they come before seq): a confirmation
            // already shown, sent again. Ack it, do not show it.
            c = Confirmations.verify(jws, gatewayKey, terminalId, BigInteger.ZERO);
            isNew = false;
        }
        String what = "seq=" + c.seq() + " intent=" + c.intentId();
        if (isNew) {
            String order = c.orderId() == null ? "" : " order=" + c.orderId();
            say("SHOW " + c.headline() + " " + what + " amount=" + c.amount() + " " + c.currency() + order);
            // Saved before the ack: after a power cut the gateway sends it again, and the state
            // file says it was shown.
            state.save(c.seq());
        } else {
            say("REPEAT " + what);
        }
        JsonObject ack = new JsonObject();
        ack.addProperty("intent_id", c.intentId());
        ack.addProperty("seq", c.seq());
        connection
                .publish(topic("acks"), ack.toString().getBytes(StandardCharsets.UTF_8), QoS.AT_LEAST_ONCE, false)
                .await(PUBACK_SECS, TimeUnit.SECONDS);
        say("ACKED " + what);
    }

    // === TLS =====================================================================================

    private static byte[] pem(String text, String label) {
        String begin = "-----BEGIN " + label + "-----";
        String end = "-----END " + label + "-----";
        int from = text.indexOf(begin);
        int to = text.indexOf(end);
        if (from < 0 || to < from) throw new IllegalArgumentException("no " + label + " PEM block");
        return Base64.getMimeDecoder().decode(text.substring(from + begin.length(), to));
    }

    /** A PKCS#8 private key (PEM "PRIVATE KEY"): P-256 from the gateway, or the terminal's own. */
    static PrivateKey privateKey(String pemText) throws Exception {
        PKCS8EncodedKeySpec spec = new PKCS8EncodedKeySpec(pem(pemText, "PRIVATE KEY"));
        for (String algorithm : List.of("EC", "Ed25519", "RSA")) {
            try {
                return KeyFactory.getInstance(algorithm).generatePrivate(spec);
            } catch (java.security.spec.InvalidKeySpecException e) {
                // another type
            }
        }
        throw new IllegalArgumentException("not an EC, Ed25519 or RSA PKCS#8 key");
    }

    /** Whether {@code key} is the private key of {@code cert}: it signs, the certificate verifies. */
    static boolean keyMatches(PrivateKey key, X509Certificate cert) throws Exception {
        String algorithm =
                switch (key.getAlgorithm()) {
                    case "EC" -> "SHA256withECDSA";
                    case "RSA" -> "SHA256withRSA";
                    default -> key.getAlgorithm(); // Ed25519, EdDSA
                };
        byte[] challenge = new byte[32];
        new SecureRandom().nextBytes(challenge);
        try {
            Signature signer = Signature.getInstance(algorithm);
            signer.initSign(key);
            signer.update(challenge);
            byte[] signature = signer.sign();
            Signature verifier = Signature.getInstance(algorithm);
            verifier.initVerify(cert.getPublicKey());
            verifier.update(challenge);
            return verifier.verify(signature);
        } catch (java.security.InvalidKeyException e) {
            return false; // the certificate's key is of another type
        }
    }

    /**
     * Trusts only the gateway CA, presents the bundle's certificate with the bundle's key or the
     * terminal's own ({@code keyPem}), and checks the broker's name against the host connected
     * to.
     */
    static SSLContext tlsContext(JsonObject bundle, String keyPem) throws Exception {
        CertificateFactory x509 = CertificateFactory.getInstance("X.509");
        Certificate ca = x509.generateCertificate(pemStream(bundle.get("ca_pem").getAsString()));
        Certificate[] chain =
                x509.generateCertificates(pemStream(bundle.get("cert_pem").getAsString()))
                        .toArray(new Certificate[0]);
        PrivateKey key = privateKey(keyPem);
        if (!keyMatches(key, (X509Certificate) chain[0])) {
            throw new IllegalArgumentException("is not the key of the bundle's certificate");
        }
        char[] password = new char[0];
        KeyStore keys = KeyStore.getInstance("PKCS12");
        keys.load(null, null);
        keys.setKeyEntry("terminal", key, password, chain);
        KeyManagerFactory kmf = KeyManagerFactory.getInstance(KeyManagerFactory.getDefaultAlgorithm());
        kmf.init(keys, password);
        KeyStore trusted = KeyStore.getInstance("PKCS12");
        trusted.load(null, null);
        trusted.setCertificateEntry("posgate-ca", ca);
        TrustManagerFactory tmf = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
        tmf.init(trusted);
        SSLContext context = SSLContext.getInstance("TLS");
        context.init(kmf.getKeyManagers(), tmf.getTrustManagers(), null);
        return checkingServerName(context);
    }

    private static ByteArrayInputStream pemStream(String pem) {
        return new ByteArrayInputStream(pem.getBytes(StandardCharsets.US_ASCII));
    }

    /**
     * {@code inner}, but every engine it makes checks the server certificate's name against the
     * host (endpoint identification): hawtdispatch makes its engines without, and a certificate
     * from the right CA for another name must not do.
     */
    static SSLContext checkingServerName(SSLContext inner) {
        SSLContextSpi spi =
                new SSLContextSpi() {
                    @Override
                    protected void engineInit(KeyManager[] km, TrustManager[] tm, SecureRandom sr)
                            throws KeyManagementException {
                        throw new KeyManagementException("initialised already");
                    }

                    @Override
                    protected SSLSocketFactory engineGetSocketFactory() {
                        throw new UnsupportedOperationException("engines only");
                    }

                    @Override
                    protected SSLServerSocketFactory engineGetServerSocketFactory() {
                        throw new UnsupportedOperationException("engines only");
                    }

                    @Override
                    protected SSLEngine engineCreateSSLEngine() {
                        throw new UnsupportedOperationException("the server name is needed");
                    }

                    @Override
                    protected SSLEngine engineCreateSSLEngine(String host, int port) {
                        SSLEngine engine = inner.createSSLEngine(host, port);
                        SSLParameters parameters = engine.getSSLParameters();
                        parameters.setEndpointIdentificationAlgorithm("HTTPS");
                        engine.setSSLParameters(parameters);
                        return engine;
                    }

                    @Override
                    protected SSLSessionContext engineGetServerSessionContext() {
                        return inner.getServerSessionContext();
                    }

                    @Override
                    protected SSLSessionContext engineGetClientSessionContext() {
                        return inner.getClientSessionContext();
                    }
                };
        return new SSLContext(spi, inner.getProvider(), inner.getProtocol()) {};
    }

    // === the state file ==========================================================================

    /** The last {@code seq} shown, kept in a small JSON file that survives reboots. */
    static final class State {
        final Path path;
        final String terminalId;
        BigInteger lastShown = BigInteger.ZERO;

        State(Path path, String terminalId) throws IOException {
            this.path = path;
            this.terminalId = terminalId;
            String text;
            try {
                text = Files.readString(path);
            } catch (NoSuchFileException e) {
                return;
            }
            JsonObject saved;
            try {
                saved = Confirmations.parseObject(text);
            } catch (IOException | IllegalStateException e) {
                // Starting from 0 would show every confirmation still queued as new: stop.
                throw new IOException("state file " + path + " is not JSON (" + e.getMessage() + "); fix or remove it");
            }
            BigInteger seq = Confirmations.unsigned(saved.get("last_shown_seq"), Confirmations.U64_MAX);
            JsonElement owner = saved.get("terminal_id");
            if (owner == null || !owner.isJsonPrimitive() || !owner.getAsString().equals(terminalId) || seq == null) {
                throw new IOException("state file " + path + " belongs to terminal " + owner
                        + " or has no last_shown_seq; this is " + terminalId);
            }
            lastShown = seq;
        }

        /**
         * Durably: write a temporary file, fsync it, rename it over the old one, fsync the
         * directory. A power cut leaves the old file or the new one, never half of one.
         */
        void save(BigInteger seq) throws IOException {
            JsonObject saved = new JsonObject();
            saved.addProperty("terminal_id", terminalId);
            saved.addProperty("last_shown_seq", seq);
            Path tmp = path.resolveSibling(path.getFileName() + ".tmp");
            try (FileChannel file =
                    FileChannel.open(tmp, StandardOpenOption.WRITE, StandardOpenOption.CREATE,
                            StandardOpenOption.TRUNCATE_EXISTING)) {
                ByteBuffer bytes = ByteBuffer.wrap(saved.toString().getBytes(StandardCharsets.UTF_8));
                while (bytes.hasRemaining()) file.write(bytes);
                file.force(true);
            }
            Files.move(tmp, path, StandardCopyOption.ATOMIC_MOVE, StandardCopyOption.REPLACE_EXISTING);
            try (FileChannel dir = FileChannel.open(path.toAbsolutePath().getParent(), StandardOpenOption.READ)) {
                dir.force(true);
            }
            lastShown = seq;
        }
    }

    // === test vectors ============================================================================

    /** Runs every case of proto/testdata/confirmation-vectors.json; 0 when all pass. */
    static int checkVectors(Path path) throws Exception {
        JsonObject vectors = Confirmations.parseObject(Files.readString(path));
        PublicKey key = Confirmations.gatewayKey(vectors.getAsJsonObject("key").getAsJsonObject("jwk"));
        int failed = 0;
        int total = 0;
        for (JsonElement element : vectors.getAsJsonArray("cases")) {
            JsonObject c = element.getAsJsonObject();
            total++;
            String name = c.get("name").getAsString();
            String expect = c.get("expect").getAsString();
            String outcome;
            try {
                BigInteger minSeq = Confirmations.unsigned(c.get("min_seq"), Confirmations.U64_MAX);
                Confirmations.Confirmation got =
                        Confirmations.verify(c.get("jws").getAsString(), key, c.get("terminal_id").getAsString(), minSeq);
                outcome = sameMembers(got.payload(), c.getAsJsonObject("payload"))
                        ? "ok"
                        : "ok, but payload " + got.payload();
            } catch (Confirmations.Refused e) {
                outcome = e.reason;
            }
            if (outcome.equals(expect)) {
                say("pass " + name + " (" + expect + ")");
            } else {
                failed++;
                say("FAIL " + name + ": expected " + expect + ", got " + outcome);
            }
        }
        say((total - failed) + " passed, " + failed + " failed");
        return failed == 0 ? 0 : 1;
    }

    /**
     * The same members with the same values, numbers compared as their text (Gson's own equals
     * compares numbers as doubles, and 2^53 + 1 would equal 2^53).
     */
    static boolean sameMembers(JsonObject a, JsonObject b) {
        if (b == null || !a.keySet().equals(b.keySet())) return false;
        for (String name : a.keySet()) {
            JsonElement x = a.get(name), y = b.get(name);
            if (!x.isJsonPrimitive() || !y.isJsonPrimitive()) return false;
            JsonPrimitive p = x.getAsJsonPrimitive(), q = y.getAsJsonPrimitive();
            if (p.isNumber() != q.isNumber() || p.isString() != q.isString()
                    || !p.getAsString().equals(q.getAsString())) {
                return false;
            }
        }
        return true;
    }

    // === main ====================================================================================

    private static int usage() {
        System.err.println(
                "usage: posgate.terminal.Terminal --bundle FILE --state FILE [--mqtt HOST:PORT] [--key FILE]\n"
                        + "       posgate.terminal.Terminal --check-vectors FILE");
        return 64;
    }

    static int launch(String[] args) throws Exception {
        String bundlePath = null, statePath = null, mqttOverride = null, vectors = null, keyPath = null;
        for (int i = 0; i < args.length; i++) {
            if (i + 1 == args.length) return usage();
            String value = args[++i];
            switch (args[i - 1]) {
                case "--bundle" -> bundlePath = value;
                case "--state" -> statePath = value;
                case "--mqtt" -> mqttOverride = value;
                case "--check-vectors" -> vectors = value;
                case "--key" -> keyPath = value;
                default -> {
                    return usage();
                }
            }
        }
        if (vectors != null) return checkVectors(Path.of(vectors));
        if (bundlePath == null || statePath == null) return usage();
        JsonObject bundle = Confirmations.parseObject(Files.readString(Path.of(bundlePath)));
        String keyPem;
        if (keyPath != null) {
            keyPem = Files.readString(Path.of(keyPath));
        } else if (bundle.has("key_pem")) {
            keyPem = bundle.get("key_pem").getAsString();
        } else {
            System.err.println("the bundle has no key_pem (provisioned from a CSR): pass --key");
            return 2;
        }
        SSLContext tls;
        try {
            tls = tlsContext(bundle, keyPem);
        } catch (IllegalArgumentException e) {
            System.err.println((keyPath != null ? keyPath : "the bundle's key_pem") + " " + e.getMessage());
            return 2;
        }
        State state;
        try {
            state = new State(Path.of(statePath), bundle.get("terminal_id").getAsString());
        } catch (IOException e) {
            System.err.println(e.getMessage());
            return 2;
        }
        URI url = new URI(bundle.get("mqtt_url").getAsString()); // mqtts://host:port
        String host = url.getHost();
        int port = url.getPort() < 0 ? 8883 : url.getPort();
        if (mqttOverride != null) {
            int colon = mqttOverride.lastIndexOf(':');
            host = mqttOverride.substring(0, colon);
            port = Integer.parseInt(mqttOverride.substring(colon + 1));
        }
        Terminal terminal = new Terminal(bundle, state, tls);
        // SIGTERM or SIGINT: say offline, disconnect cleanly, exit 0. The JVM runs shutdown hooks
        // on those signals; this one waits for run() to finish, then ends the process with 0
        // rather than the signal's 143.
        CountDownLatch done = new CountDownLatch(1);
        Runtime.getRuntime()
                .addShutdownHook(
                        new Thread(
                                () -> {
                                    terminal.stop();
                                    try {
                                        done.await(PUBACK_SECS, TimeUnit.SECONDS);
                                    } catch (InterruptedException e) {
                                        Thread.currentThread().interrupt();
                                    }
                                    System.out.flush();
                                    Runtime.getRuntime().halt(0);
                                }));
        terminal.run(host, port);
        done.countDown();
        return 0;
    }

    public static void main(String[] args) throws Exception {
        int status = launch(args);
        // hawtdispatch's threads would keep the JVM alive.
        System.exit(status);
    }
}
