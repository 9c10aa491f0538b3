# kmesh-rs images, one stage each, named as in config/:
#   docker build --target kmesh-operator -t kmesh-rs/kmesh-operator .
#   docker build --target kmesh-agent    -t kmesh-rs/kmesh-agent .    (the default target)
#
# The builder runs the repository's own setup script, so the images are built with exactly the
# toolchain CI uses (stable Rust with rust-src, bpf-linker against LLVM 22).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN bash scripts/setup.sh --no-kernel \
 && cargo build --release --locked -p kmesh-agent -p kmesh-operator

# The operator runs as a non-root user. The user is numeric so that the kubelet can verify the
# Deployment's runAsNonRoot (a user name cannot be checked: the kubelet refuses to start it).
FROM debian:bookworm-slim AS kmesh-operator
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/kmesh-operator /usr/local/bin/kmesh-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kmesh-operator"]

# The node agent runs privileged, as root (bpf(), cgroup attachment, setns into pod namespaces).
FROM debian:bookworm-slim AS kmesh-agent
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/kmesh-agent /usr/local/bin/kmesh-agent
ENTRYPOINT ["/usr/local/bin/kmesh-agent"]
