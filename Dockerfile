# syntax=docker/dockerfile:1
# The operator image for people with Docker (or any BuildKit builder) and
# registry access. CI builds the image without either: scripts/build-image
# assembles it FROM scratch with buildah. Both give the same layout, which
# tests/image/test_dockerfile.py keeps in step:
#   /usr/local/bin/bitbucket-operator (entrypoint, default command `run`),
#   built --release --locked --no-default-features (no simulator);
#   user 65532:65532, no shell; /var/lib/bitbucket-operator owned by 65532;
#   CA certificates at /etc/ssl/certs/ca-certificates.crt.
# Here the libraries and certificates come from distroless/cc (glibc,
# libgcc, ca-certificates, nonroot user 65532).
#
#   docker build -t bitbucket-operator \
#     --build-arg VERSION="$(git describe --always --dirty)" \
#     --build-arg REVISION="$(git rev-parse HEAD)" .

FROM rust:1-bookworm AS builder
WORKDIR /src
# The build context is trimmed by .dockerignore (no target/, charts/, ...).
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --no-default-features --bin bitbucket-operator \
    && cp target/release/bitbucket-operator /bitbucket-operator \
    && install -d -m 0700 /store

FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=unknown
ARG REVISION=unknown
LABEL org.opencontainers.image.title="bitbucket-operator" \
      org.opencontainers.image.description="Kubernetes operator: self-hosted identity-governance connector for Bitbucket Cloud" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/example/bitbucket-operator" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY --from=builder /bitbucket-operator /usr/local/bin/bitbucket-operator
COPY --from=builder --chown=65532:65532 /store /var/lib/bitbucket-operator
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65532:65532
WORKDIR /
EXPOSE 8080 8081
ENTRYPOINT ["/usr/local/bin/bitbucket-operator"]
CMD ["run"]
