//! Bad input on every socket of the real bridge binary: protocol garbage (the connection is
//! closed, the process stays up and serves the next caller), each request limit at the
//! limit and just over it (a clear error naming the limit), and the modes of every socket
//! and directory the bridge creates.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use svid_bridge::mount_ns_test;
use svid_bridge::testing as common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::bridge::{
    Bridge, SdsStream, request, sds_client, secrets_of, spire_options_for_bridge,
    start_bridge_for_tester,
};
use common::{Spire, wait_until_with};
use prost::Message;
use svid_bridge::proto::csi::GetPluginInfoRequest;
use svid_bridge::proto::csi::identity_client::IdentityClient;
use svid_bridge::proto::pluginregistration::InfoRequest;
use svid_bridge::proto::pluginregistration::registration_client::RegistrationClient;

const WAIT: Duration = Duration::from_secs(30);
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A kubelet root under /tmp (short socket paths) with `pods/`.
fn kubelet_root() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("sbk-")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::create_dir_all(dir.path().join("pods")).unwrap();
    dir
}

fn csi_args(root: &Path) -> Vec<String> {
    vec![
        format!("--csi-socket={}", root.join("csi.sock").display()),
        format!("--kubelet-root={}", root.display()),
        "--node-id=node-1".to_owned(),
    ]
}

fn start(spire: &Spire, args: &[String]) -> Bridge {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Bridge::start_with(spire, &args)
}

/// A minimal HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Deterministic pseudo-random bytes (xorshift), so a failure can be replayed.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The garbage a hostile or broken client may send.
fn garbage_cases() -> Vec<(&'static str, Vec<u8>, bool)> {
    let mut huge_frame = PREFACE.to_vec();
    huge_frame.extend(frame(0x4, 0, 0, &[])); // empty SETTINGS
    // A DATA frame declaring 16 MiB − 1 (the largest length a frame header can carry),
    // followed by 16 MiB of payload, far above the 16 KiB SETTINGS_MAX_FRAME_SIZE.
    huge_frame.extend([0xff, 0xff, 0xff, 0x0, 0x0, 0, 0, 0, 1]);
    huge_frame.extend(vec![0u8; 16 * 1024 * 1024]);
    let mut headers_garbage = PREFACE.to_vec();
    headers_garbage.extend(frame(0x4, 0, 0, &[]));
    headers_garbage.extend(frame(0x1, 0x4, 1, &noise(7, 4000)));
    vec![
        // (what, bytes, half-close after sending)
        ("64 KiB of random bytes", noise(42, 64 * 1024), false),
        ("a truncated HTTP/2 preface, then EOF", PREFACE[..14].to_vec(), true),
        ("HTTP/1.1", b"POST /envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".to_vec(), false),
        ("HTTP/1.1 upgrade to h2c", b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n".to_vec(), false),
        ("a 16 MiB frame", huge_frame, false),
        ("HEADERS of random HPACK", headers_garbage, false),
    ]
}

/// Sends `bytes` and reads until the server closes; true if it did within the deadline.
fn server_closes(socket: &Path, bytes: &[u8], half_close: bool) -> (bool, Vec<u8>) {
    let mut conn = UnixStream::connect(socket).unwrap();
    conn.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    conn.set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut received = Vec::new();
    // Write in chunks, draining what the server says meanwhile (it may close mid-way).
    for chunk in bytes.chunks(64 * 1024) {
        if conn.write_all(chunk).is_err() {
            break;
        }
    }
    if half_close {
        let _ = conn.shutdown(std::net::Shutdown::Write);
    }
    let deadline = Instant::now() + WAIT;
    let mut buf = [0u8; 16 * 1024];
    while Instant::now() < deadline {
        match conn.read(&mut buf) {
            Ok(0) => return (true, received),
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => return (true, received),
        }
    }
    (false, received)
}

/// Every socket the bridge serves (SDS, CSI, kubelet registration) gets each kind of
/// garbage: the connection is closed, nothing is served over HTTP/1.1, the bridge stays up,
/// and a valid call on the same socket works right after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_garbage_on_every_socket_is_refused() {
    let spire = Spire::start(spire_options_for_bridge("example.org"));
    spire.register_test_binary("tester");
    let root = kubelet_root();
    let mut bridge = start(&spire, &csi_args(root.path()));
    let sds = bridge.sds_socket();
    let csi = root.path().join("csi.sock");
    let registration = root.path().join("plugins_registry/csi.spiffe.io-reg.sock");
    tokio::task::block_in_place(|| {
        wait_until_with(WAIT, "the registration socket appears", &[&bridge], || {
            registration.exists().then_some(())
        })
    });
    let mut tried = 0;
    for (socket_name, socket) in [
        ("SDS", &sds),
        ("CSI", &csi),
        ("registration", &registration),
    ] {
        for (what, bytes, half_close) in garbage_cases() {
            let (closed, answer) =
                tokio::task::block_in_place(|| server_closes(socket, &bytes, half_close));
            assert!(
                closed,
                "{socket_name}: {what}: the connection was not closed"
            );
            let text = String::from_utf8_lossy(&answer);
            assert!(
                !text.contains("HTTP/1.1 200"),
                "{socket_name}: {what}: served over HTTP/1.1: {text}"
            );
            assert_eq!(
                bridge_exit(&mut bridge),
                None,
                "{socket_name}: {what}: the bridge died"
            );
            // A valid call on the same socket, right after.
            match socket_name {
                "SDS" => {
                    let response = sds_client(socket)
                        .fetch_secrets(request(&["default"]))
                        .await
                        .unwrap()
                        .into_inner();
                    assert_eq!(secrets_of(&response)[0].name, "default");
                }
                "CSI" => {
                    let channel = svid_bridge::csi::connect_uds(socket).await.unwrap();
                    let info = IdentityClient::new(channel)
                        .get_plugin_info(GetPluginInfoRequest {})
                        .await
                        .unwrap();
                    assert_eq!(info.into_inner().name, "csi.spiffe.io");
                }
                _ => {
                    let channel = svid_bridge::csi::connect_uds(socket).await.unwrap();
                    let info = RegistrationClient::new(channel)
                        .get_info(InfoRequest {})
                        .await
                        .unwrap();
                    assert_eq!(info.into_inner().name, "csi.spiffe.io");
                }
            }
            tried += 1;
        }
    }
    // A connection that sends half a preface and then nothing is not closed by the server
    // (no preface timeout: bounded only by --max-connections); it costs one descriptor.
    let mut stalled = UnixStream::connect(&sds).unwrap();
    stalled.write_all(&PREFACE[..10]).unwrap();
    let response = sds_client(&sds)
        .fetch_secrets(request(&["default"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        secrets_of(&response).len(),
        1,
        "others are served while a connection stalls"
    );
    assert!(!bridge.logs().contains("panicked"));
    eprintln!(
        "FIGURES garbage: sockets=3 inputs_per_socket={} connections_closed={tried} bridge_restarts=0",
        garbage_cases().len()
    );
}

fn bridge_exit(bridge: &mut Bridge) -> Option<i32> {
    // Bridge has no try_status; a dead process has no /proc/<pid>/stat or is a zombie.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", bridge.pid())).unwrap_or_default();
    let state = stat
        .rsplit(')')
        .next()
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or("X");
    (state == "Z" || state == "X").then_some(1)
}

// -------------------------------------------------------------------------- limits ----

/// Raw HTTP/2 on the SDS socket: HPACK literals without indexing, so no encoder is needed.
fn literal(name: &str, value: &str) -> Vec<u8> {
    let mut out = vec![0x00, name.len() as u8];
    out.extend_from_slice(name.as_bytes());
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
    out
}

fn stream_secrets_headers() -> Vec<u8> {
    [
        literal(":method", "POST"),
        literal(":scheme", "http"),
        literal(
            ":path",
            "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets",
        ),
        literal(":authority", "localhost"),
        literal("content-type", "application/grpc"),
        literal("te", "trailers"),
    ]
    .concat()
}

/// Reads frames until `done` says so or the deadline passes: (type, flags, stream, payload).
fn read_frames(
    conn: &mut UnixStream,
    mut done: impl FnMut(&[(u8, u8, u32, Vec<u8>)]) -> bool,
) -> Vec<(u8, u8, u32, Vec<u8>)> {
    conn.set_read_timeout(Some(WAIT)).unwrap();
    let mut frames = Vec::new();
    let deadline = Instant::now() + WAIT;
    while !done(&frames) && Instant::now() < deadline {
        let mut head = [0u8; 9];
        if conn.read_exact(&mut head).is_err() {
            break;
        }
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        if conn.read_exact(&mut payload).is_err() {
            break;
        }
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        frames.push((head[3], head[4], stream, payload));
    }
    frames
}

fn settings_value(payload: &[u8], id: u16) -> Option<u32> {
    payload
        .chunks(6)
        .find(|c| c.len() == 6 && u16::from_be_bytes([c[0], c[1]]) == id)
        .map(|c| u32::from_be_bytes([c[2], c[3], c[4], c[5]]))
}

/// A DiscoveryRequest whose encoded size is exactly `size` bytes (padded in `node.id`,
/// which no other limit looks at).
fn request_of_size(
    size: usize,
) -> envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest {
    let mut req = request(&["default"]);
    let estimate = size.saturating_sub(req.encoded_len());
    for pad in estimate.saturating_sub(8)..estimate + 8 {
        req.node.as_mut().unwrap().id = "x".repeat(pad);
        if req.encoded_len() == size {
            return req;
        }
    }
    panic!("no request of exactly {size} bytes");
}

/// Every SDS limit, each at the limit (served) and one over it (refused with an error that
/// names the limit), on bridges started with small values of the flags.
/// An Envoy pointed at the SDS socket with the wrong API (ADS, or an SDS method nobody
/// serves) gets UNIMPLEMENTED, as it did from the generated server our own routing replaced
/// (src/sds/grpc.rs), and the bridge goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_we_do_not_serve_are_unimplemented() {
    use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
    use tonic::codegen::http::uri::PathAndQuery;

    let (_spire, bridge) = start_bridge_for_tester();
    let socket = bridge.sds_socket();
    for path in [
        "/envoy.service.secret.v3.SecretDiscoveryService/NoSuchMethod",
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
    ] {
        let channel = svid_bridge::identity::source::unix_channel(socket.clone());
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let err = grpc
            .unary::<DiscoveryRequest, DiscoveryResponse, _>(
                tonic::Request::new(request(&["default"])),
                PathAndQuery::from_static(path),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unimplemented, "{path}: {err:?}");
    }
    let response = sds_client(&socket)
        .fetch_secrets(request(&["default"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(secrets_of(&response).len(), 1, "still serving");
}

/// No compression is agreed on the SDS socket: a stream whose requests say they are
/// compressed is refused with UNIMPLEMENTED naming the encoding, as tonic's generated servers
/// answer (the bridge reads stream requests with its own decoder, src/uds/inbound.rs), and
/// the connection's next stream is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_stream_requests_are_refused_saying_why() {
    let (_spire, bridge) = start_bridge_for_tester();
    let mut client = sds_client(&bridge.sds_socket());

    // Streams that stay open after their request, as Envoy's do.
    let open_stream = || {
        use futures::StreamExt;
        futures::stream::iter(vec![request(&["default"])]).chain(futures::stream::pending())
    };
    let mut compressed = tonic::Request::new(open_stream());
    compressed.metadata_mut().insert(
        "grpc-encoding",
        tonic::metadata::MetadataValue::from_static("gzip"),
    );
    let err = client.stream_secrets(compressed).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
    assert!(
        err.message().contains("\"gzip\"") && err.message().contains("uncompressed"),
        "the error names the encoding and the way out: {}",
        err.message()
    );

    let mut responses = client
        .stream_secrets(tonic::Request::new(open_stream()))
        .await
        .unwrap()
        .into_inner();
    let response = tokio::time::timeout(WAIT, responses.message())
        .await
        .expect("a response within the deadline")
        .unwrap()
        .expect("a response, not the end of the stream");
    assert_eq!(secrets_of(&response)[0].name, "default", "still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_limit_holds_at_the_limit_and_refuses_just_over_it() {
    let spire = Spire::start(spire_options_for_bridge("example.org"));
    let tester = spire.register_test_binary("tester");
    let mut figures = Vec::new();

    // --max-names-per-request, --max-name-bytes, --max-request-bytes.
    let bridge = start(
        &spire,
        &[
            "--max-names-per-request=5".into(),
            "--max-name-bytes=64".into(),
            "--max-request-bytes=4096".into(),
        ],
    );
    let socket = bridge.sds_socket();
    let five = [
        "default",
        "ROOTCA",
        "ALL",
        "spiffe://example.org",
        tester.as_str(),
    ];
    let response = sds_client(&socket)
        .fetch_secrets(request(&five))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(secrets_of(&response).len(), 5, "5 names: at the limit");
    let six = [&five[..], &["spiffe://example.org/six"]].concat();
    let err = sds_client(&socket)
        .fetch_secrets(request(&six))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .contains("6 resource names in one request; the limit is 5"),
        "{}",
        err.message()
    );
    figures.push("names_per_request=5:ok,6:InvalidArgument");

    let name_of = |len: usize| {
        format!(
            "spiffe://example.org/{}",
            "n".repeat(len - "spiffe://example.org/".len())
        )
    };
    let mut at_limit = SdsStream::open(&socket, request(&["default", &name_of(64)]))
        .await
        .unwrap();
    let response = at_limit.next(WAIT).await.unwrap();
    assert_eq!(
        secrets_of(&response)[0].name,
        "default",
        "a 64-byte name is accepted (and waits)"
    );
    let mut over = SdsStream::open(&socket, request(&["default", &name_of(65)]))
        .await
        .unwrap();
    let err = over.next(WAIT).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("longer than the limit of 64 bytes"),
        "{}",
        err.message()
    );
    figures.push("name_bytes=64:ok,65:InvalidArgument");

    let response = sds_client(&socket)
        .fetch_secrets(request_of_size(4096))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        secrets_of(&response).len(),
        1,
        "a 4096-byte request is accepted"
    );
    let err = sds_client(&socket)
        .fetch_secrets(request_of_size(4097))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.code(),
            tonic::Code::ResourceExhausted | tonic::Code::OutOfRange
        ),
        "{err:?}"
    );
    assert!(
        err.message().contains("4096"),
        "the error names the limit: {}",
        err.message()
    );
    figures.push("request_bytes=4096:ok,4097:ResourceExhausted/OutOfRange");
    // The same limit on a stream, whose requests the bridge decodes itself (src/uds/inbound.rs).
    let mut stream_at_limit = SdsStream::open(&socket, request_of_size(4096))
        .await
        .unwrap();
    assert_eq!(
        secrets_of(&stream_at_limit.next(WAIT).await.unwrap()).len(),
        1,
        "a 4096-byte request on a stream is accepted"
    );
    let mut stream_over = SdsStream::open(&socket, request_of_size(4097))
        .await
        .unwrap();
    let err = stream_over.next(WAIT).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    assert!(
        err.message()
            .contains("4097 bytes is over the limit of 4096 bytes"),
        "the error names the limit: {}",
        err.message()
    );
    figures.push("stream_request_bytes=4096:ok,4097:OutOfRange");
    drop((at_limit, over, stream_at_limit, stream_over, bridge));

    // --max-streams-per-connection: the server advertises it (SETTINGS_MAX_CONCURRENT_STREAMS)
    // and refuses a stream over it with REFUSED_STREAM; the streams under it are served.
    let bridge = start(&spire, &["--max-streams-per-connection=4".into()]);
    let mut conn = UnixStream::connect(bridge.sds_socket()).unwrap();
    conn.write_all(&[PREFACE, &frame(0x4, 0, 0, &[])].concat())
        .unwrap();
    let frames = read_frames(&mut conn, |f| {
        f.iter().any(|(t, flags, _, _)| *t == 0x4 && flags & 1 == 0)
    });
    let settings = frames
        .iter()
        .find(|(t, flags, _, _)| *t == 0x4 && flags & 1 == 0)
        .expect("server SETTINGS");
    assert_eq!(
        settings_value(&settings.3, 0x3),
        Some(4),
        "SETTINGS_MAX_CONCURRENT_STREAMS"
    );
    let mut out = frame(0x4, 0x1, 0, &[]); // ACK the server's SETTINGS
    for stream in [1u32, 3, 5, 7, 9] {
        out.extend(frame(0x1, 0x4, stream, &stream_secrets_headers()));
    }
    conn.write_all(&out).unwrap();
    let frames = read_frames(&mut conn, |f| {
        let answered = |s: u32| {
            f.iter()
                .any(|(t, _, id, _)| *id == s && (*t == 0x1 || *t == 0x3))
        };
        [1, 3, 5, 7, 9].iter().all(|s| answered(*s))
    });
    let reset = |s: u32| {
        frames
            .iter()
            .find(|(t, _, id, _)| *t == 0x3 && *id == s)
            .map(|(_, _, _, p)| u32::from_be_bytes([p[0], p[1], p[2], p[3]]))
    };
    for stream in [1, 3, 5, 7] {
        assert_eq!(
            reset(stream),
            None,
            "stream {stream} (within the limit) was reset"
        );
        assert!(
            frames
                .iter()
                .any(|(t, _, id, _)| *t == 0x1 && *id == stream),
            "stream {stream} got response headers"
        );
    }
    assert_eq!(
        reset(9),
        Some(0x7),
        "the 5th stream is refused with REFUSED_STREAM"
    );
    drop((conn, bridge));
    figures.push("streams_per_connection=4:ok,5:REFUSED_STREAM");

    // --max-streams-per-process.
    let bridge = start(&spire, &["--max-streams-per-process=3".into()]);
    let socket = bridge.sds_socket();
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut s = SdsStream::open(&socket, request(&["default"]))
            .await
            .unwrap();
        s.next(WAIT).await.unwrap();
        open.push(s);
    }
    let err = match SdsStream::open(&socket, request(&["default"])).await {
        Err(status) => status,
        Ok(mut s) => s.next(WAIT).await.unwrap_err(),
    };
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("--max-streams-per-process") && err.message().contains('3'),
        "{}",
        err.message()
    );
    open.pop();
    let deadline = Instant::now() + WAIT;
    loop {
        match SdsStream::open(&socket, request(&["default"])).await {
            Ok(mut s) => match s.next(WAIT).await {
                Ok(_) => break,
                Err(e) if Instant::now() > deadline => {
                    panic!("a closed stream's slot is not reused: {e:?}")
                }
                Err(_) => {}
            },
            Err(e) if Instant::now() > deadline => {
                panic!("a closed stream's slot is not reused: {e:?}")
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop((open, bridge));
    figures.push("streams_per_process=3:ok,4:ResourceExhausted");

    // --max-connections: a fourth connection is closed at once and logged.
    let bridge = start(&spire, &["--max-connections=3".into()]);
    let socket = bridge.sds_socket();
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut client = sds_client(&socket);
        client.fetch_secrets(request(&["default"])).await.unwrap();
        held.push(client);
    }
    // The client sees its connection closed under it (a transport error, not a status
    // from the server).
    let err = sds_client(&socket)
        .fetch_secrets(request(&["default"]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        ),
        "{err:?}"
    );
    assert!(
        std::error::Error::source(&err).is_some(),
        "a transport error, not a server status: {err:?}"
    );
    let (closed, _) = tokio::task::block_in_place(|| server_closes(&socket, &[], false));
    assert!(closed, "a connection over the limit is closed at once");
    assert!(
        bridge.logs().contains("--max-connections"),
        "the refusal is logged"
    );
    held.pop();
    let served = tokio::task::block_in_place(|| {
        let runtime = tokio::runtime::Handle::current();
        wait_until_with(
            WAIT,
            "a freed connection slot is reused",
            &[&bridge],
            || {
                runtime
                    .block_on(sds_client(&socket).fetch_secrets(request(&["default"])))
                    .ok()
            },
        )
    });
    assert_eq!(secrets_of(served.get_ref()).len(), 1);
    figures.push("connections=3:ok,4:closed");
    eprintln!("FIGURES limits: {}", figures.join(" "));
}

// --------------------------------------------------------------------------- modes ----

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

mount_ns_test! {
    /// The modes of what `svid-bridge run` creates, whatever its umask: SDS socket 0666,
    /// CSI socket 0600, registration socket 0600, the plugins_registry directory 0750 and
    /// pod target directories 0750 (spiffe-csi-driver's, P-10).
    async fn sockets_and_directories_have_their_documented_modes() {
        let spire = tokio::task::block_in_place(|| Spire::start(spire_options_for_bridge("example.org")));
        let root = kubelet_root();
        let bridge = tokio::task::block_in_place(|| start(&spire, &csi_args(root.path())));
        let registration = root.path().join("plugins_registry/csi.spiffe.io-reg.sock");
        tokio::task::block_in_place(|| {
            wait_until_with(WAIT, "the registration socket appears", &[&bridge], || registration.exists().then_some(()))
        });
        // The pod's target, published through the CSI socket.
        let parent = root.path().join("pods/pod-1/volumes/kubernetes.io~csi/spiffe");
        std::fs::create_dir_all(&parent).unwrap();
        let target = parent.join("mount");
        let channel = svid_bridge::csi::connect_uds(&root.path().join("csi.sock")).await.unwrap();
        let mut node = svid_bridge::proto::csi::node_client::NodeClient::new(channel);
        let mut publish = svid_bridge::proto::csi::NodePublishVolumeRequest {
            volume_id: "vol-1".into(),
            target_path: target.to_string_lossy().into_owned(),
            readonly: true,
            ..Default::default()
        };
        publish.volume_capability = Some(svid_bridge::proto::csi::VolumeCapability {
            access_type: Some(svid_bridge::proto::csi::volume_capability::AccessType::Mount(Default::default())),
            access_mode: Some(svid_bridge::proto::csi::volume_capability::AccessMode { mode: 1 }),
        });
        publish.volume_context.insert("csi.storage.k8s.io/ephemeral".into(), "true".into());
        node.node_publish_volume(publish).await.unwrap();
        // The target directory itself is under the mount: look at it through a
        // non-recursive bind of its parent, which does not carry the mount.
        let peek = root.path().join("peek");
        std::fs::create_dir(&peek).unwrap();
        rustix::mount::mount_bind(&parent, &peek).unwrap();
        let found = [
            ("SDS socket", mode(&bridge.sds_socket()), 0o666),
            ("CSI socket", mode(&root.path().join("csi.sock")), 0o600),
            ("registration socket", mode(&registration), 0o600),
            ("plugins_registry directory", mode(&root.path().join("plugins_registry")), 0o750),
            ("pod target directory", mode(&peek.join("mount")), 0o750),
        ];
        rustix::mount::unmount(&peek, rustix::mount::UnmountFlags::empty()).unwrap();
        let report: Vec<String> = found.iter().map(|(what, m, _)| format!("{}={m:o}", what.replace(' ', "_"))).collect();
        eprintln!("FIGURES modes: {}", report.join(" "));
        for (what, found, expected) in found {
            assert_eq!(found, expected, "{what}: mode {found:o}, expected {expected:o}");
        }
    }
}
