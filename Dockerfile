# The kmesh-rs image: the static (musl) binaries and nothing else: no shell, no libc, no base image.
#
# Built by scripts/image.sh, which compiles the binaries on the host first and then runs
#   buildah --storage-driver vfs bud -f Dockerfile .
# with the repository as the context, so no Docker engine, registry or base image is needed.
# .dockerignore lets only these binaries into the context.
#
# One image for every component: a pod picks its binary with `command`. The default user is the
# numeric non-root 65532 (the operator's Deployment sets runAsNonRoot, which needs a numeric user);
# the agent's DaemonSet runs it as root (runAsUser: 0, privileged) to load eBPF programs.
FROM scratch

ARG VERSION=unknown
ARG REVISION=unknown
LABEL org.opencontainers.image.title="kmesh-rs" \
      org.opencontainers.image.description="kmesh-rs, a sidecarless eBPF service mesh data plane: kmesh-operator, kmesh-agent, kmesh-waypoint and kmeshctl as static binaries" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"

COPY target/x86_64-unknown-linux-musl/release/kmesh-operator \
     target/x86_64-unknown-linux-musl/release/kmesh-agent \
     target/x86_64-unknown-linux-musl/release/kmeshctl \
     target/x86_64-unknown-linux-musl/release/kmesh-waypoint \
     /usr/local/bin/

ENV PATH=/usr/local/bin
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kmesh-operator"]
