# kmesh-rs node agent image.
#
# The builder runs the repository's own setup script, so the image is built with exactly the
# toolchain CI uses (stable Rust with rust-src, bpf-linker against LLVM 22).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN bash scripts/setup.sh --no-kernel \
 && cargo build --release --locked -p kmesh-agent

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/kmesh-agent /usr/local/bin/kmesh-agent
ENTRYPOINT ["/usr/local/bin/kmesh-agent"]
