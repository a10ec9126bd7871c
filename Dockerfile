# syntax=docker/dockerfile:1
# Operator image: the Rust binary on distroless (glibc, CA certificates, no
# shell), running as the distroless nonroot user 65532.

FROM rust:1-bookworm AS builder
WORKDIR /src
# The build context is trimmed by .dockerignore (no target/, charts/, ...).
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin bitbucket-operator \
    && cp target/release/bitbucket-operator /bitbucket-operator

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="bitbucket-operator" \
      org.opencontainers.image.description="Kubernetes operator: self-hosted identity-governance connector for Bitbucket Cloud" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /bitbucket-operator /usr/local/bin/bitbucket-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/bitbucket-operator"]
CMD ["run"]
