# syntax=docker/dockerfile:1
# The svid-bridge image: one static-enough binary on a distroless base.
#
#   docker build -t <registry>/svid-bridge:<version> .
#
# The build step is exactly `make release-build` (cargo build --release --locked), which
# `make test` runs, so a release build that breaks or a stale Cargo.lock shows up without a
# container engine.

# Any Rust >= Cargo.toml's rust-version; the Debian release matches the runtime's, so the
# binary links against the same glibc.
ARG RUST_VERSION=1.95
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# Everything `cargo build` reads: the manifest and lock, the proto files build.rs compiles
# (with protox: no protoc in the image), the sources, and the bench targets Cargo.toml
# declares (Cargo resolves every target when it loads the manifest).
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto/ proto/
COPY src/ src/
COPY benches/ benches/
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && install -D -m 0755 target/release/svid-bridge /out/svid-bridge

# glibc and libgcc, nothing else: no shell, no package manager. Mounts are made with the
# mount(2) family directly, so util-linux is not needed. It runs as root (the default user of
# this variant, not :nonroot): bind mounts into kubelet pod directories and reading other
# processes' /proc entries need it, and the DaemonSet is privileged anyway.
FROM gcr.io/distroless/cc-debian12
COPY --from=build /out/svid-bridge /svid-bridge
# Exec form: the bridge is PID 1 and gets SIGTERM itself, so it removes its sockets (and its
# kubelet registration) on shutdown.
ENTRYPOINT ["/svid-bridge"]
CMD ["run"]
